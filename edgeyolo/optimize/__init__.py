"""Model-side passes on top of ``edgeyolo.train``: structured pruning, the zeroing baseline,
knowledge distillation and activation swaps. Each returns an ordinary ``Model`` that
``save_model`` writes as a checkpoint every command accepts."""
