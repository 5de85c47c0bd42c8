"""Sources of connection records: the kernel's socket tables, and its events."""
