"""thinkbroad: workflows."""
