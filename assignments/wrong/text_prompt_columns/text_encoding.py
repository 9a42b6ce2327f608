"""A typical wrong solution: the first 34 columns of the padded batch cut, which assumes right padding."""

from assignments.solutions.text_encoding import grouped_query_attention  # noqa: F401  (the mistake is below)


def prompt_rows(hidden, attention_mask, prefix_tokens=34):
    mask = attention_mask[:, prefix_tokens:]
    return hidden[:, prefix_tokens:] * mask[..., None].to(hidden.dtype), mask
