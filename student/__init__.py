"""thinkbroad: student."""
