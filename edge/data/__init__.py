"""Real text that every machine has offline, split deterministically."""
