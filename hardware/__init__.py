"""thinkbroad: what the machine can do (processor features that decide precision), and the Ray runtime on it
(`runtime`: starting or joining Ray, stopping on SIGINT/SIGTERM). Imports nothing of the project."""
