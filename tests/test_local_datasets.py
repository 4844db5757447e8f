"""A local dataset dir always loads its current files.

datasets 5.2 caches a dir with a README `configs:` block under the dir's name and that block only: a second
dir of the same name got the first one's rows, and edited files were not seen. Without the block it keys by
paths and mtimes, which miss an edit that keeps the mtime. Each test gets its own datasets cache, so the
result does not depend on what earlier runs left there.
"""

import json
import os

import datasets
import pytest

from common import load_dataset

README = """---
configs:
- config_name: default
  data_files:
  - split: train_sft
    path: train_sft.jsonl
  - split: test_gen
    path: test_gen.jsonl
---
Rows in the layout of tests/fixtures/ultrafeedback.
"""
# without the README, datasets names the splits after the file names' keywords
SPLITS = {True: ("train_sft", "test_gen"), False: ("train", "test")}
FILES = ("train_sft", "test_gen")


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def write_dir(path: str, tag: str, readme: bool, rows: int = 3) -> str:
    """A dir of two JSON-lines files whose prompts name `tag`; same tag length and rows -> same file sizes."""
    os.makedirs(path, exist_ok=True)
    for file in FILES:
        with open(os.path.join(path, f"{file}.jsonl"), "w") as f:
            f.writelines(json.dumps({"prompt": f"{tag} {file} {i}"}) + "\n" for i in range(rows))
    if readme:
        with open(os.path.join(path, "README.md"), "w") as f:
            f.write(README)
    return path


def expected(tag: str, readme: bool, rows: int = 3) -> dict[str, list[str]]:
    return {split: [f"{tag} {file} {i}" for i in range(rows)] for split, file in zip(SPLITS[readme], FILES)}


def prompts(path: str) -> dict[str, list[str]]:
    return {split: list(rows["prompt"]) for split, rows in load_dataset(path).items()}


def sizes(path: str) -> list[int]:
    return [os.path.getsize(os.path.join(path, f"{file}.jsonl")) for file in FILES]


@pytest.mark.parametrize("readme", [True, False], ids=["readme_configs", "plain"])
def test_same_named_dirs_load_their_own_rows(tmp_path, readme):
    """tests/fixtures/ultrafeedback next to a user's ultrafeedback/: each loads its own rows."""
    first = write_dir(str(tmp_path / "a" / "ultrafeedback"), "AAA", readme)
    second = write_dir(str(tmp_path / "b" / "ultrafeedback"), "BBB", readme, rows=4)
    assert prompts(first) == expected("AAA", readme)
    assert prompts(second) == expected("BBB", readme, rows=4)
    assert prompts(first) == expected("AAA", readme)


@pytest.mark.parametrize("readme", [True, False], ids=["readme_configs", "plain"])
@pytest.mark.parametrize("same_size", [True, False], ids=["same_size", "longer"])
def test_edited_file_is_seen(tmp_path, readme, same_size):
    path = write_dir(str(tmp_path / "ultrafeedback"), "AAA", readme)
    before = sizes(path)
    assert prompts(path) == expected("AAA", readme)
    write_dir(path, "BBB", readme, rows=3 if same_size else 5)
    assert (sizes(path) == before) == same_size
    assert prompts(path) == expected("BBB", readme, rows=3 if same_size else 5)


@pytest.mark.parametrize("readme", [True, False], ids=["readme_configs", "plain"])
def test_edit_that_keeps_size_and_mtime_is_seen(tmp_path, readme):
    """cp -p, rsync -t and tar set the old mtime back; datasets' own key of a plain dir is paths and mtimes."""
    path = write_dir(str(tmp_path / "ultrafeedback"), "AAA", readme)
    stats = {file: os.stat(os.path.join(path, f"{file}.jsonl")) for file in FILES}
    assert prompts(path) == expected("AAA", readme)
    write_dir(path, "BBB", readme)
    for file, st in stats.items():
        os.utime(os.path.join(path, f"{file}.jsonl"), ns=(st.st_atime_ns, st.st_mtime_ns))
    assert all(os.stat(os.path.join(path, f"{file}.jsonl")).st_size == st.st_size for file, st in stats.items())
    assert prompts(path) == expected("BBB", readme)


def test_unchanged_dir_reuses_its_cache(tmp_path):
    """The fix keys the cache, it does not turn it off: a second load of the same files reads the same Arrow files."""
    path = write_dir(str(tmp_path / "ultrafeedback"), "AAA", readme=True)
    first = {split: rows.cache_files for split, rows in load_dataset(path).items()}
    second = {split: rows.cache_files for split, rows in load_dataset(path).items()}
    assert first == second and all(first.values())
