"""Prompt sources: built-in sets, text files, datasets (in memory and streamed), seeding and errors."""

import datasets
import pytest

from tdpo_trl.prompts import DatasetPromptSource, PromptSource, get_prompt_function


def test_builtin_simple_animals():
    source = PromptSource.from_name("simple_animals", template="a photo of a {}", seed=0)
    assert len(source.prompts) == 45 and len(set(source.prompts)) == 45
    assert {"cat", "dog", "kangaroo"} <= set(source.prompts)
    prompt, metadata = source()
    assert prompt.startswith("a photo of a ") and metadata == {}


def test_same_seed_same_stream_and_global_rng_untouched():
    import random

    state = random.getstate()
    a = PromptSource.from_name("simple_animals", seed=1).sample(20)
    assert a == PromptSource.from_name("simple_animals", seed=1).sample(20)
    assert a != PromptSource.from_name("simple_animals", seed=2).sample(20)
    assert random.getstate() == state


def test_text_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# my prompts\na red car\n\na blue boat\n")
    source = get_prompt_function(str(path), seed=0)
    assert source.prompts == ["a red car", "a blue boat"]
    assert set(source.sample(30)) == {"a red car", "a blue boat"}


@pytest.mark.parametrize(
    "content, error, message",
    [
        (None, FileNotFoundError, "does not exist"),
        ("\n# only a comment\n", ValueError, "holds no prompt"),
    ],
)
def test_bad_files(tmp_path, content, error, message):
    path = tmp_path / "prompts.txt"
    if content is not None:
        path.write_text(content)
    with pytest.raises(error, match=message):
        PromptSource.from_file(str(path))


def test_unknown_spec_and_bad_template():
    with pytest.raises(ValueError, match="not a built-in set"):
        get_prompt_function("no_such_set")
    with pytest.raises(ValueError, match="exactly one"):
        PromptSource(["a"], template="a {} and {}")


@pytest.fixture
def saved_dataset(tmp_path):
    rows = {"caption": [f"prompt {i}" for i in range(50)], "id": list(range(50))}
    parquet = tmp_path / "prompts.parquet"
    datasets.Dataset.from_dict(rows).to_parquet(parquet)
    return parquet


def test_dataset_in_memory_and_streamed(saved_dataset):
    parquet = saved_dataset
    in_memory = DatasetPromptSource(
        "parquet", "caption", dataset=datasets.load_dataset("parquet", data_files=str(parquet), split="train"), seed=0
    )
    drawn = [in_memory()[0] for _ in range(100)]
    assert set(drawn) <= {f"prompt {i}" for i in range(50)} and len(set(drawn)) > 30

    streamed = get_prompt_function(
        "dataset:parquet", column="caption", streaming=True, buffer_size=8, data_files=str(parquet)
    )
    first_pass = [streamed()[0] for _ in range(50)]
    assert sorted(first_pass) == sorted(f"prompt {i}" for i in range(50))  # every row once per pass
    second_pass = [streamed()[0] for _ in range(50)]
    assert sorted(second_pass) == sorted(first_pass) and second_pass != first_pass  # cycled, reshuffled


def test_dataset_errors(saved_dataset):
    parquet = saved_dataset
    data = datasets.load_dataset("parquet", data_files=str(parquet), split="train")
    with pytest.raises(ValueError, match=r"has no column 'prompt'; its columns are \['caption', 'id'\]"):
        DatasetPromptSource("parquet", "prompt", dataset=data)
    with pytest.raises(ValueError, match="is empty"):
        DatasetPromptSource("empty", "caption", dataset=data.select([]))


def test_a_restored_stream_continues_with_the_prompts_an_uninterrupted_one_draws(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("".join(f"prompt {i}\n" for i in range(50)))

    def stream():
        return DatasetPromptSource("text", "text", data_files=str(path), streaming=True, buffer_size=8, seed=3)

    straight = stream()
    drawn = [straight()[0] for _ in range(130)]  # more than two passes: each pass has its own shuffle
    for stop in (7, 50, 64):  # mid-pass, at a pass boundary, in the second pass
        first = stream()
        [first() for _ in range(stop)]
        resumed = stream()
        resumed.load_state_dict(first.state_dict())
        assert [resumed()[0] for _ in range(130 - stop)] == drawn[stop:], f"differs after a stop at {stop}"
    assert sorted(drawn[:50]) == sorted(f"prompt {i}" for i in range(50)), "a pass yields every prompt once"
    assert drawn[:50] != drawn[50:100], "the second pass is shuffled differently"
    # the non-streamed and fixed-list sources restore their RNG the same way
    fixed = PromptSource(["a", "b", "c"], seed=1)
    [fixed() for _ in range(5)]
    copy = PromptSource(["a", "b", "c"], seed=2)
    copy.load_state_dict(fixed.state_dict())
    assert [copy()[0] for _ in range(10)] == [fixed()[0] for _ in range(10)]
