"""thinkbroad: mpcot."""
