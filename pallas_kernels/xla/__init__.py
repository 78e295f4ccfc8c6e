"""Pure-XLA joint attention (no Pallas): the blocked online-softmax path that is fastest on CPU."""
