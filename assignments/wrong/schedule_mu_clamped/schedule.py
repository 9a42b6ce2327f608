"""A typical wrong solution: mu clamped to [base_shift, max_shift] instead of extrapolated."""

from assignments.solutions.schedule import get_sigmas, shift_sigmas  # noqa: F401  (the mistake is in compute_mu)


def compute_mu(image_seq_len, base_seq_len=256, max_seq_len=8192, base_shift=0.5, max_shift=0.9):
    fraction = (image_seq_len - base_seq_len) / (max_seq_len - base_seq_len)
    return base_shift + (max_shift - base_shift) * min(max(fraction, 0.0), 1.0)
