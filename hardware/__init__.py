"""thinkbroad: what the machine can do (processor features that decide precision)."""
