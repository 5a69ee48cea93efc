"""instill: Subtask Induction toolkit."""
