"""Using a trained model: the fast step, sampling, evaluation, the cache pointer, dynamic evaluation, scoring."""
