"""LongBench-format data (Bai et al., arXiv 2308.14508) from a JSONL file the user
gives: one object per line with `context`, `input`, `answers`, `all_classes` and
`dataset`; each sample is scored with the metric LongBench uses for its dataset."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.eval.prompt import PromptFormat
from kvsqueeze.eval.sample import Sample
from kvsqueeze.eval.tasks.base import TaskRequest

METRIC_OF_DATASET = {
    **dict.fromkeys(
        ["narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "musique", "triviaqa"], "qa_f1"
    ),
    **dict.fromkeys(["gov_report", "qmsum", "multi_news", "samsum"], "rouge"),
    **dict.fromkeys(["trec", "lsht"], "classification"),
    "passage_retrieval_en": "retrieval",
    "passage_retrieval_zh": "retrieval_zh",
    "passage_count": "count",
    **dict.fromkeys(["lcc", "repobench-p"], "code_sim"),
}
NEEDS_SEGMENTATION = {"multifieldqa_zh", "dureader", "vcsum"}

# Our instruction and answer length per metric (LongBench words its own per dataset).
INSTRUCTION = {
    "qa_f1": ("Answer the question based on the text above, as briefly as possible.", 32),
    "rouge": ("Write a short summary that answers the request, based on the text above.", 128),
    "classification": ("Give the category of the input, like the examples above do.", 16),
    "retrieval": ('Which paragraph above is the following summary from? Answer like "Paragraph 3".', 16),
    "retrieval_zh": ('上面哪一段是下面摘要的出处？请回答"段落3"这样的格式。', 16),
    "count": ("How many unique paragraphs does the text above hold? Answer with a number.", 16),
    "code_sim": ("Write the next line of the code above.", 64),
}
FIELDS = ("context", "input", "answers", "dataset")


def dataset_metric(dataset: str) -> str:
    name = dataset.removesuffix("_e")  # LongBench-E names its datasets "<name>_e"
    if name in NEEDS_SEGMENTATION:
        raise KVSqueezeError(f"LongBench dataset {dataset!r} needs Chinese word segmentation, which is not supported")
    if name not in METRIC_OF_DATASET:
        raise KVSqueezeError(f"unknown LongBench dataset {dataset!r}; known: {', '.join(sorted(METRIC_OF_DATASET))}")
    return METRIC_OF_DATASET[name]


def read_jsonl(path: Path) -> list[dict]:
    """Every record of a LongBench JSONL file, checked; errors name file and line."""
    if not path.is_file():
        raise KVSqueezeError(f"data file {path} does not exist")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise KVSqueezeError(f"{path} line {number}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise KVSqueezeError(f"{path} line {number}: expected a JSON object")
        missing = [f for f in FIELDS if f not in record]
        if missing:
            raise KVSqueezeError(f"{path} line {number}: missing field {missing[0]!r}")
        if not isinstance(record["answers"], list) or not record["answers"]:
            raise KVSqueezeError(f"{path} line {number}: 'answers' must be a non-empty list")
        dataset_metric(str(record["dataset"]))
        records.append(record)
    if not records:
        raise KVSqueezeError(f"{path} holds no samples")
    return records


def truncate_middle(fmt: PromptFormat, context: str, question: str, prefix: str, length: int) -> str:
    """The context with its middle cut so the prompt fits `length` tokens (as
    LongBench does: the start and end of a document carry the most)."""
    ids = fmt.tokens(context)

    def keep(n: int) -> str:
        return context if n >= len(ids) else fmt.tokenizer.decode(ids[: n // 2] + ids[len(ids) - (n - n // 2) :])

    return fmt.fit(keep, question, prefix, length, most=len(ids))


@dataclass(frozen=True)
class LongBenchTask:
    name: str = "longbench"
    needs_lengths: bool = False

    def samples(self, fmt: PromptFormat, request: TaskRequest) -> Iterator[Sample]:
        if request.data is None:
            raise KVSqueezeError("the longbench task needs --data FILE (LongBench-format JSONL)")
        taken: Counter[str] = Counter()
        for record in read_jsonl(request.data):
            dataset = str(record["dataset"])
            if taken[dataset] >= request.samples:
                continue
            metric = dataset_metric(dataset)
            instruction, max_new = INSTRUCTION[metric]
            question, prefix = f"{instruction}\n\n{record['input']}".strip(), "Answer:"
            answers = tuple(str(a) for a in record["answers"])
            for length in request.lengths or (0,):
                context = str(record["context"])
                if length:
                    context = truncate_middle(fmt, context, question, prefix, length)
                yield Sample(
                    task=f"{self.name}/{dataset}",
                    index=taken[dataset],
                    length=length or fmt.count(context, question, prefix),
                    depth=None,
                    context=context,
                    question=question,
                    answers=answers,
                    metric=metric,
                    max_new_tokens=max_new,
                    answer_prefix=prefix,
                    target=" " + answers[0],
                    all_classes=tuple(str(c) for c in record.get("all_classes") or ()),
                    single_line=metric not in ("rouge", "code_sim"),
                )
            taken[dataset] += 1
