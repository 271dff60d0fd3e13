"""thinkbroad: teacher."""
