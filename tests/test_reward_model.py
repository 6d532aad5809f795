"""The reward model: scores at the last token, packed = plain, and checkpoints transformers loads as
`Qwen2ForSequenceClassification` with the same scores."""

import torch
import transformers

from align.model import PackedLayout, Qwen2Config, Qwen2ForCausalLM
from reward.model import load_reward_model, save_reward_model

PAD = 0


def small_lm_dir(tmp_path, tied: bool = True):
    config = Qwen2Config(vocab_size=101, hidden_size=32, intermediate_size=56, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied, rope_theta=10_000.0,
                         max_position_embeddings=128)
    path = tmp_path / "lm"
    Qwen2ForCausalLM.from_config(config, seed=1).save_pretrained(path)
    return path


def sequences(lengths, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 101, (n,), generator=generator) for n in lengths]  # never the pad id 0


def test_packed_scores_equal_one_sequence_at_a_time(tmp_path):
    model = load_reward_model(small_lm_dir(tmp_path)).eval()
    seqs = sequences([5, 9, 3, 12])
    with torch.no_grad():
        alone = torch.stack([model(s[None])[0] for s in seqs])
        positions = torch.cat([torch.arange(len(s)) for s in seqs])[None]
        packed = model(torch.cat(seqs)[None], position_ids=positions)
        layout = PackedLayout.from_position_ids(positions)
        with_layout = model(torch.cat(seqs)[None], layout=layout)
        padded = torch.full((len(seqs), 12), PAD)
        for i, s in enumerate(seqs):
            padded[i, : len(s)] = s
        right_padded = model(padded, last_index=torch.tensor([len(s) - 1 for s in seqs]))
    assert packed.shape == (4,)
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(with_layout, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(right_padded, alone, atol=1e-5, rtol=1e-5)
    assert alone.std() > 0  # the head is initialised: different sequences score differently


def test_checkpoint_loads_in_transformers_as_sequence_classifier(tmp_path):
    for tied in (True, False):
        model = load_reward_model(small_lm_dir(tmp_path / str(tied), tied=tied)).eval()
        with torch.no_grad():  # train the head off its init so a dropped head would show
            model.score.weight.mul_(3.0)
        out = tmp_path / f"rm-{tied}"
        save_reward_model(model.config, model.state_dict(), out, pad_token_id=PAD)

        hf, info = transformers.Qwen2ForSequenceClassification.from_pretrained(out, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        assert hf.config.num_labels == 1 and hf.config.pad_token_id == PAD
        seqs = sequences([4, 7, 11], seed=2)
        padded = torch.full((3, 11), PAD)
        for i, s in enumerate(seqs):
            padded[i, : len(s)] = s
        with torch.no_grad():
            theirs = hf.eval()(input_ids=padded, attention_mask=(padded != PAD).long()).logits.squeeze(-1)
            ours = model(padded, last_index=torch.tensor([len(s) - 1 for s in seqs]))
            reloaded = load_reward_model(out).eval()(padded, last_index=torch.tensor([len(s) - 1 for s in seqs]))
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(reloaded, ours)  # the saved head is read back, not re-initialised
