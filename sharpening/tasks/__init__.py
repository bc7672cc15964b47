"""Built-in tasks: answer extractors and the character-level demo task."""
