"""thinkbroad: serve."""
