"""Held-out evaluation prompts: no training caption uses them, and the mini teacher's tokenizer knows every word."""

import json

import pytest
from transformers import CLIPTokenizer

from lcm.cli import MINI_TEACHER, main as lcm_main
from lcm.digits import CAPTION_TEMPLATES, HELD_OUT_TEMPLATES, PROMPT_SETS, caption, eval_prompts
from lcm.evaluate import Row, markdown_table

from _helpers import save_noisy_mini_lora


def _all_captions(templates):
    return {caption(d, t, templates) for d in range(10) for t in range(len(templates))}


def test_no_held_out_prompt_is_a_training_caption(tmp_path):
    assert not set(HELD_OUT_TEMPLATES) & set(CAPTION_TEMPLATES)
    assert len(set(HELD_OUT_TEMPLATES)) == len(HELD_OUT_TEMPLATES)
    # Formatted, not only as templates: "{w}" and "{d}" variants must not collide with any training string either.
    assert not _all_captions(HELD_OUT_TEMPLATES) & _all_captions(CAPTION_TEMPLATES)
    # The students' data: `lcm data digits` captions (drawn from the training templates) hold none of them.
    assert lcm_main(["data", "digits", "--out", str(tmp_path / "d")]) == 0
    folder = {json.loads(line)["text"] for line in (tmp_path / "d" / "metadata.jsonl").read_text().splitlines()}
    assert folder <= _all_captions(CAPTION_TEMPLATES) and not folder & _all_captions(HELD_OUT_TEMPLATES)


@pytest.mark.parametrize("subfolder", ["tokenizer", "tokenizer_2"])
@pytest.mark.parametrize("templates", [CAPTION_TEMPLATES, HELD_OUT_TEMPLATES], ids=["train", "heldout"])
def test_every_word_is_one_known_token_of_the_mini_teacher(subfolder, templates):
    """Not merely "not <unk>": the byte-level BPE spells an unseen word in single letters the teacher never learned
    as a word, so each word must be its own whole-word token (`seven</w>`), as in training."""
    tok = CLIPTokenizer.from_pretrained(MINI_TEACHER, subfolder=subfolder)
    vocab = tok.get_vocab()
    for prompt in _all_captions(templates):
        tokens = tok.tokenize(prompt)
        assert tokens == [w + "</w>" for w in prompt.replace(",", " , ").split()], prompt
        assert all(t in vocab and vocab[t] != tok.unk_token_id for t in tokens), prompt


def test_held_out_eval_prompts_ask_for_the_same_digits():
    train, heldout = eval_prompts(130, "train"), eval_prompts(130, "heldout")
    assert train[1] == heldout[1] and train[0] != heldout[0]
    assert set(heldout[0]) == _all_captions(HELD_OUT_TEMPLATES)  # 120 ≥ 10 × 12: every (digit, template) pair
    assert set(PROMPT_SETS) == {"train", "heldout"}
    with pytest.raises(ValueError, match="heldout"):
        eval_prompts(10, "unseen")


def test_table_has_a_held_out_section():
    rows = [Row("DDIM", 2, 1.5, 0.9, 70.0, 0.01), Row("DDIM", 2, 1.5, 0.8, 80.0, 0.01, "heldout")]
    table = markdown_table(rows, 19.0, 10)
    train, heldout = table.split("### Held-out prompts")
    assert "| 70.0 |" in train and "| 80.0 |" not in train and "| 80.0 |" in heldout
    assert "###" not in markdown_table(rows[:1], 19.0, 10)  # one prompt set: the table as before


def test_lcm_eval_heldout_rows_for_teacher_and_student(tmp_path):
    save_noisy_mini_lora(tmp_path / "lora")
    out = tmp_path / "eval"
    assert lcm_main(["eval", "--lora", str(tmp_path / "lora"), "--out", str(out), "--n", "10", "--steps", "2",
                     "--methods", "DDIM,LCM-LoRA", "--prompts", "both"]) == 0
    result = json.loads((out / "results.json").read_text())
    cells = [(r["method"], r["steps"], r["prompts"]) for r in result["rows"]]
    assert cells == [("DDIM", 2, "train"), ("DDIM", 2, "heldout"), ("DDIM", 25, "train"), ("DDIM", 25, "heldout"),
                     ("LCM-LoRA", 2, "train"), ("LCM-LoRA", 2, "heldout")]
    assert result["prompt_sets"]["heldout"] == list(HELD_OUT_TEMPLATES)
    by = {(r["method"], r["steps"], r["prompts"]): r for r in result["rows"]}
    # Same seeds and digits, other text: different images, so a different FD.
    assert by[("DDIM", 2, "train")]["frechet"] != by[("DDIM", 2, "heldout")]["frechet"]
    assert (out / "grids" / "LCM-LoRA_2step_heldout.png").is_file()
    assert "### Held-out prompts" in (out / "table.md").read_text()
