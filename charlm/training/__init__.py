"""Training: the plan (options, sizing, resume), the loop, its optimisers and state, distributed runs."""
