"""T3, the text-to-speech-token model: the backend interface and its two implementations.

``backend`` (the interface), ``torch_backend`` (our own batched inference with CUDA graphs),
``vllm_backend`` (chatterbox-vllm on vLLM); ``model``, ``sampling``, ``text`` and ``stream`` are
the pieces the torch backend is built from.
"""
