"""Data: read files, render conversations through the chat template, audit the masks.

``load_sft_data(path, tokenizer, data_config)`` returns ``PreparedData`` (``.samples``: rendered
samples with ``input_ids``/``loss_mask``/``weights``; ``.audit``: the pre-flight report) and
``preflight(prepared, allow_errors=...)`` prints the summary and refuses hard errors. Batching
(packing, token-budget micro-batches) lives in ``posttrain.data.batching``.
"""

from posttrain.data.audit import AuditReport, PreparedData, load_sft_data, preflight
from posttrain.data.formats import Conversation, conversation_from_row, normalise_messages, read_rows
from posttrain.data.render import RenderedSample, Span, render_conversation, render_prompt

__all__ = [
    "AuditReport",
    "Conversation",
    "PreparedData",
    "RenderedSample",
    "Span",
    "conversation_from_row",
    "load_sft_data",
    "normalise_messages",
    "preflight",
    "read_rows",
    "render_conversation",
    "render_prompt",
]
