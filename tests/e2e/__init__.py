"""End to end: recipes, real data, several processes, every bad input through the CLI."""
