"""Discrete diffusion: CTMC processes over token sequences and exact toy data (Jump Your Steps).

processes (CTMCs), samplers, jys (KLUB and the schedule search), toy (exact toys), model (the
transformer denoiser, in a `model_folder`), data (Countdown). Nothing here imports the digits
world (`digits.digit_tokens` is its token task) or the image models.
"""
