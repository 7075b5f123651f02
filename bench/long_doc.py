"""The ``long-doc`` workload: questions about long documents, the documents' KV reused.

``num_docs`` documents of ``doc_len`` tokens each (the dataset's text, shuffled with the
seed and concatenated to length; each document starts from a different text, so no two
share a prefix by accident), and ``questions_per_doc`` short questions about each (the
dataset's human turns, cut to ``question_len`` tokens). A request is one user message: the
document, then ``Question:`` and the question, in the model's chat framing. Questions are
interleaved across documents (question 0 of every document, then question 1, ...), so a
document's KV is reused while the others are being read. Token ids are sent (see
``text_tokens``).
"""

from __future__ import annotations

import itertools
import random

from pdserve.bench.chat import dataset_texts, text_stream
from pdserve.bench.sharegpt import exchanges, load_entries
from pdserve.bench.text_tokens import ChatTokens, take
from pdserve.bench.workloads import RequestSpec, Workload


def long_doc_workload(
    dataset: str,
    num_docs: int,
    questions_per_doc: int,
    doc_len: tuple[int, int],
    question_len: tuple[int, int],
    output_len: tuple[int, int],
    seed: int,
    tokens: ChatTokens,
    max_len: int = 2048,
) -> Workload:
    """The long-doc workload; raises ValueError when a prompt + output exceeds ``max_len``."""
    if num_docs < 1 or questions_per_doc < 1:
        raise ValueError(f"long-doc needs --num-docs and --questions-per-doc >= 1, got "
                         f"{num_docs}, {questions_per_doc}")
    entries = load_entries(dataset)
    texts = dataset_texts(entries, tokens)
    asks = [tokens.encode(ask) for entry in entries for ask, _ in exchanges(entry)]
    if num_docs > len(texts):
        raise ValueError(f"--num-docs {num_docs} is more than the {len(texts)} texts of "
                         f"{dataset} that documents start from")
    rng = random.Random(seed)
    separator = tokens.encode("\n\n") if tokens.exact else ()
    starts = rng.sample(range(len(texts)), num_docs)
    docs = []
    for start in starts:
        rest = text_stream([t for k, t in enumerate(texts) if k != start], rng, separator)
        docs.append(take(itertools.chain([texts[start] + separator], rest), rng.randint(*doc_len)))
    cue = tokens.encode("\n\nQuestion: ")
    questions = text_stream(asks, rng, separator)
    requests = []
    for q in range(questions_per_doc):
        for d, doc in enumerate(docs):
            content = doc + cue + take(questions, rng.randint(*question_len))
            ids = tokens.prompt([("user", content)])
            n_out = rng.randint(*output_len)
            if len(ids) + n_out > max_len:
                raise ValueError(f"long-doc: a prompt of {len(ids)} tokens + {n_out} output "
                                 f"exceeds --max-len {max_len}; lower --doc-len or raise "
                                 f"--max-len")
            requests.append(RequestSpec(n_out, len(ids), prompt_token_ids=ids,
                                        tag=f"doc{d}/q{q}"))
    note = (f"{num_docs} documents x {questions_per_doc} questions from {dataset}, "
            f"documents of {', '.join(str(len(d)) for d in docs)} tokens")
    return Workload("long-doc", requests, note=note)

