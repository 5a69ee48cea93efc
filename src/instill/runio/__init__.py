"""Run I/O: config files and typed configs, run provenance, and run directories that resume.

`configfiles` reads YAML/JSON and `--set` assignments, `typed` turns them into the experiments'
dataclasses and back, `provenance` records what a run needs to be reproduced, and `rundir`
holds one run's directory (config check on resume, manifest of outputs). File writing itself
lives in `instill.storage`.
"""

from instill.runio.configfiles import load_config_file, parse_assignments
from instill.runio.provenance import file_sha256, hash_files, run_metadata
from instill.runio.rundir import RUN_FORMAT_VERSION, RunDir
from instill.runio.typed import from_dict, to_dict

__all__ = ["RUN_FORMAT_VERSION", "RunDir", "file_sha256", "from_dict", "hash_files",
           "load_config_file", "parse_assignments", "run_metadata", "to_dict"]
