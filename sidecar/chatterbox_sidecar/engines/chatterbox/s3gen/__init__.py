"""S3Gen, speech tokens to 24 kHz audio: chunked streaming decode, CUDA graphs, loading.

``stream`` (the chunked, batched decoder), ``graphs`` (CUDA-graph replay and other inference
speed-ups), ``loader`` (weights).
"""
