"""The instruct task: chat-template prompts, loss on reply tokens only, logits only where supervised, label
scoring and greedy generation, the zero-shot / k-shot baselines of a run, and chat JSONL files.

Every equality is against a plain computation on the model's full output (right-padded, one row at a time)."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

import lorakit
from lorakit.data import ChatDataset, load_data, read_chats
from lorakit.errors import ConfigError, DataError
from lorakit.models import load_model
from lorakit.train import RunConfig
from lorakit.train import train as train_run
from lorakit.train.run import pick_shots, whole_prompts
from lorakit.train.tasks import IGNORE, MIN_SHARED_PREFIX, Instruct, _left_pad, make_task
from lorakit.train.trainer import evaluate

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = pytest.mark.usefixtures("one_thread_module")
TEXTS = ["a truly wonderful film", "dull and lifeless", "I loved every minute", "a waste of two hours",
         "warm, funny and smart", "the plot makes no sense at all, and the acting is worse", "great", "bad"]


@pytest.fixture(scope="module")
def chats():
    return ChatDataset.from_texts(TEXTS, [1, 0, 1, 0, 1, 0, 1, 0])


@pytest.fixture(scope="module")
def model_and_task(chats):
    model, tok = load_model("tiny-llama", "instruct", texts=chats.texts(), seed=1)
    torch.manual_seed(0)  # the same adapter in every session, whatever ran before
    lorakit.inject(model, lorakit.AdapterConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    for name, p in model.named_parameters():  # non-zero B: the adapter changes every output
        if "lora_B" in name:
            p.data.normal_(0, 0.2)
    return model.eval(), make_task("instruct", tok, 64, 2, chats.choices)


def reference_rows(model, task, examples):
    """Per example, alone and without padding: (prompt ids, reply ids + EOS, full-sequence logits)."""
    tok = task.tokenizer
    out = []
    for e in examples:
        text = tok.apply_chat_template(e["messages"], add_generation_prompt=True, tokenize=False)
        prompt = tok(text, add_special_tokens=False)["input_ids"]
        reply = tok(e["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + reply])).logits[0]
        out.append((prompt, reply, logits))
    return out


def test_collate_left_pads_and_supervises_only_the_reply(model_and_task, chats):
    _, task = model_and_task
    tok = task.tokenizer
    batch = task.collate([chats[i] for i in range(4)])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    for row in range(4):
        ids, labels, mask = batch["input_ids"][row], batch["labels"][row], batch["attention_mask"][row]
        real = mask.bool()
        assert not real[: int((~real).sum())].any(), "padding must be on the left"
        supervised = ids[labels != IGNORE].tolist()
        assert supervised[-1] == tok.eos_token_id
        assert tok.decode(supervised[:-1]) == chats.responses[row]
        assert (labels[~real] == IGNORE).all()
        prompt_text = tok.decode(batch["prompts"][row])
        assert prompt_text.endswith("<|assistant|>\n") and TEXTS[row] in prompt_text
    assert batch["choice"].tolist() == [1, 0, 1, 0]


def test_loss_equals_the_full_logits_computation_and_runs_the_head_only_where_supervised(model_and_task, chats):
    model, task = model_and_task
    examples = [chats[i] for i in range(len(chats))]
    nll, count = 0.0, 0
    for prompt, reply, logits in reference_rows(model, task, examples):
        pred = logits[len(prompt) - 1: len(prompt) + len(reply) - 1]
        nll += F.cross_entropy(pred, torch.tensor(reply), reduction="sum").item()
        count += len(reply)
    rows_seen, embedded = [], []
    hooks = [model.lm_head.register_forward_hook(lambda m, i, o: rows_seen.append(i[0].shape[1])),
             model.get_input_embeddings().register_forward_hook(lambda m, i, o: embedded.append(tuple(i[0].shape)))]
    try:
        with torch.no_grad():
            loss = task.loss(model, task.collate(examples))
    finally:
        for hook in hooks:
            hook.remove()
    assert loss.item() == pytest.approx(nll / count, rel=1e-5)
    assert embedded[0][0] == 1 and embedded[0][1] >= MIN_SHARED_PREFIX, "the shared prompt prefix runs once"
    assert embedded[1][0] == len(examples)
    longest_reply = max(len(task.tokenizer(e["response"], add_special_tokens=False)["input_ids"]) + 1
                        for e in examples)
    assert rows_seen == [longest_reply + 1], "the LM head must see only the positions that predict reply tokens"
    assert rows_seen[0] < task.collate(examples)["input_ids"].shape[1]


def test_gradient_flows_to_the_adapter_only_from_reply_tokens(model_and_task, chats):
    model, task = model_and_task
    model.zero_grad()
    task.loss(model, task.collate([chats[0], chats[5]])).backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    model.zero_grad()


def test_a_shared_prefix_gives_the_gradients_of_whole_rows(model_and_task, chats, monkeypatch):
    """Training runs the prompt prefix every row shares once: loss and adapter gradients equal whole-row ones."""
    model, task = model_and_task
    batch = task.collate([chats[i] for i in range(len(chats))])

    def loss_and_grads():
        model.zero_grad()
        loss = task.loss(model, batch)
        loss.backward()
        return loss.detach(), [p.grad.clone() for n, p in model.named_parameters() if "lora_" in n]
    model.train()
    try:
        assert task._shared_length(model, batch["input_ids"], batch["attention_mask"], 1) >= MIN_SHARED_PREFIX
        shared = loss_and_grads()
        monkeypatch.setattr(task, "share_prefix", False)
        whole = loss_and_grads()
    finally:
        model.eval().zero_grad()
    torch.testing.assert_close(shared[0], whole[0], rtol=1e-5, atol=1e-6)
    for got, want in zip(shared[1], whole[1]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_training_forwards_that_must_be_whole_do_not_share(chats):
    """Dropout would draw one mask for every row's prefix; gradient checkpointing drops caches."""
    model, tok = load_model("tiny-llama", "instruct", texts=chats.texts(), seed=1)
    lorakit.inject(model, lorakit.AdapterConfig(r=4, target_modules="all-linear", lora_dropout=0.1))
    task = make_task("instruct", tok, 64, 2, chats.choices)
    batch = task.collate([chats[0], chats[1]])
    length = lambda: task._shared_length(model, batch["input_ids"], batch["attention_mask"], 1)  # noqa: E731
    with torch.no_grad():
        assert length() >= MIN_SHARED_PREFIX  # evaluation shares: dropout is off there
    model.train()
    assert length() == 0
    model.eval()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    assert length() == 0


def test_greedy_replies_equal_transformers_generate(model_and_task, chats, monkeypatch):
    """The decoding loop (shared prefix, KV cache, positions of left-padded rows, ended rows leaving the batch)
    gives `generate`'s greedy tokens under the same stopping rule. The tiny model's replies hold no label words,
    so the rule here is "a full stop": rows end at different steps (or run to `max_new_tokens`)."""
    from transformers import StoppingCriteria

    model, task = model_and_task
    tok = task.tokenizer
    monkeypatch.setattr(Instruct, "_decided", lambda self, reply: "." in reply)
    padded = _left_pad(task.collate([chats[i] for i in range(len(chats))])["prompts"], tok.pad_token_id)
    width = padded["input_ids"].shape[1]

    class SameRule(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            replies = tok.batch_decode(input_ids[:, width:], skip_special_tokens=True)
            return torch.tensor([task._decided(r) for r in replies])
    with torch.no_grad():
        logits, cache, mask = task._forward(model, padded["input_ids"], padded["attention_mask"], 1, use_cache=True)
        ours = task._greedy_replies(model, logits, cache, mask)
        reference = model.generate(**padded, max_new_tokens=task.max_new_tokens, do_sample=False,
                                   pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                   stopping_criteria=[SameRule()])
    assert ours == tok.batch_decode(reference[:, width:], skip_special_tokens=True)
    lengths = (reference[:, width:] != tok.pad_token_id).sum(1)
    assert len(set(lengths.tolist())) > 2, "rows should end at different steps"


def test_a_sharded_model_decodes_in_lockstep(model_and_task, chats, monkeypatch):
    """On an FSDP model every rank must make the same forward calls: no shared-prefix pass, and decoding goes on
    with the whole batch until no rank has a row left. The replies are those of the pruned loop."""
    import lorakit.train.tasks as tasks

    model, task = model_and_task
    monkeypatch.setattr(Instruct, "_decided", lambda self, reply: "." in reply)
    padded = _left_pad(task.collate([chats[i] for i in range(len(chats))])["prompts"], task.tokenizer.pad_token_id)

    def replies():
        with torch.no_grad():
            logits, cache, mask = task._forward(model, padded["input_ids"], padded["attention_mask"], 1, True)
            return task._greedy_replies(model, logits, cache, mask)
    alone = replies()
    rows, asked = [], []
    monkeypatch.setattr(tasks, "is_sharded", lambda m: True)
    monkeypatch.setattr(tasks.Processes, "from_env", classmethod(lambda cls: cls(0, 2)))
    monkeypatch.setattr(tasks, "_on_any_rank", lambda flag, synced: asked.append(synced) or bool(flag))
    hook = model.get_input_embeddings().register_forward_hook(lambda m, i, o: rows.append(i[0].shape[0]))
    try:
        assert replies() == alone
    finally:
        hook.remove()
    assert set(rows) == {len(chats)} and len(rows) > 2  # one prefill, then every decoding step with every row
    assert asked and all(asked)


def test_label_scoring_matches_log_probabilities(model_and_task, chats):
    """Single-token choices read the prompt's last position; the general path (one forward per choice) gives the
    same scores, and both equal the summed log-softmax of each choice's tokens after the prompt."""
    model, task = model_and_task
    examples = [chats[i] for i in range(len(chats))]
    batch = task.collate(examples)
    expected = []
    for prompt, _, _ in reference_rows(model, task, examples):
        row = []
        for ids in task.choice_ids:
            with torch.no_grad():
                logp = model(input_ids=torch.tensor([prompt + ids])).logits[0].log_softmax(-1)
            row.append(sum(logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(ids)))
        expected.append(row)
    expected = torch.tensor(expected)
    with torch.no_grad():
        general = task._choice_scores(model, batch["prompts"])
        stats = task.stats(model, batch)
    torch.testing.assert_close(general, expected, rtol=1e-5, atol=1e-5)
    gold = torch.tensor([e["label"] for e in examples])
    pred = expected.argmax(-1)
    confusion = stats[2:6].view(2, 2)
    assert confusion.sum() == len(examples)
    assert confusion.trace().item() == (pred == gold).sum().item()
    metrics = task.metrics(stats)
    assert metrics["accuracy"] == (pred == gold).float().mean().item()
    assert metrics["majority_class_rate"] == 0.5
    assert "generation_accuracy" not in metrics  # teacher-forced evaluation does not generate


def test_multi_token_choices_are_scored_over_all_their_tokens(model_and_task, chats):
    model, task = model_and_task
    long_task = make_task("instruct", task.tokenizer, 64, 2, ("quite negative indeed", "quite positive indeed"))
    assert all(len(c) > 1 for c in long_task.choice_ids)
    prompts = long_task.collate([chats[0], chats[1]])["prompts"]
    with torch.no_grad():
        scores = long_task._choice_scores(model, prompts)
        for row, prompt in enumerate(prompts):
            for col, ids in enumerate(long_task.choice_ids):
                logp = model(input_ids=torch.tensor([prompt + ids])).logits[0].log_softmax(-1)
                want = sum(logp[len(prompt) - 1 + i, t] for i, t in enumerate(ids))
                assert scores[row, col].item() == pytest.approx(want.item(), rel=1e-5, abs=1e-5)


def test_padding_does_not_change_a_row(model_and_task, chats):
    """Position ids count real tokens, so a short row padded next to a long one scores as it does alone."""
    model, task = model_and_task
    with torch.no_grad():
        alone = task.stats(model, task.collate([chats[6]]))
        padded = task.stats(model, task.collate([chats[6], chats[5]])) - task.stats(model, task.collate([chats[5]]))
    torch.testing.assert_close(padded[:2], alone[:2], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reply,index", [("negative", 0), ("Positive!", 1), ("The sentiment is POSITIVE.", 1),
                                         ("neutral, not positive", 1), ("neutral", 2), ("positively great", 2),
                                         ("", 2)])
def test_parse_takes_the_first_choice_word(model_and_task, reply, index):
    assert model_and_task[1].parse(reply) == index


def test_generation_stats_count_every_example(model_and_task, chats):
    model, task = model_and_task
    task.generate = True
    try:
        metrics = evaluate(model, task, chats, batch_size=3)
    finally:
        task.generate = False
    assert set(metrics) == {"eval_accuracy", "eval_f1", "eval_macro_f1", "eval_majority_class_rate",
                            "eval_predicted_share_0", "eval_predicted_share_1", "eval_generation_accuracy",
                            "eval_unparseable"}
    assert metrics["eval_predicted_share_0"] + metrics["eval_predicted_share_1"] == pytest.approx(1.0)
    assert 0 <= metrics["eval_generation_accuracy"] + metrics["eval_unparseable"] <= 1
    teacher_forced = evaluate(model, task, chats, batch_size=3)
    assert teacher_forced["eval_accuracy"] == metrics["eval_accuracy"]  # generate's first-step logits agree


def test_a_tokenizer_without_chat_template_is_refused(model_and_task):
    tok = model_and_task[1].tokenizer
    saved, tok.chat_template = tok.chat_template, None
    try:
        with pytest.raises(ConfigError, match="chat template"):
            Instruct(tok, 64, 2, ("a", "b"))
    finally:
        tok.chat_template = saved


def test_vader_instruct_data():
    splits = load_data("vader:movies", "instruct")
    classification = load_data("vader:movies", "classification")
    assert len(splits.test) == len(classification.test) == 2000
    assert splits.test.labels == classification.test.labels
    e = splits.test[0]
    assert e["messages"] == [{"role": "user", "content": "Is the sentiment of this text positive or negative? "
                                                         f"Answer with one word.\n\n{classification.test.texts[0]}"}]
    assert e["response"] == ("negative", "positive")[e["label"]]


def test_shots_are_balanced_and_prepended(chats):
    shots = pick_shots(chats, 4, seed=0)
    assert sorted(shots.labels) == [0, 0, 1, 1]
    prompted = chats.with_shots(shots)
    turns = prompted[0]["messages"]
    assert len(turns) == 9 and [t["role"] for t in turns[:2]] == ["user", "assistant"]
    assert turns[1]["content"] == shots.responses[0] and turns[-1] == chats[0]["messages"][0]


def test_read_chats(tmp_path):
    path = tmp_path / "chats.jsonl"
    rows = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "Hello."}]},
            {"prompt": "2+2=", "completion": "4"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = read_chats(path)
    assert data.responses == ["Hello.", "4"]
    assert data.messages[0] == rows[0]["messages"][:2] and data.messages[1] == [{"role": "user", "content": "2+2="}]
    assert not data.choices and len(data[0]) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"}]}) + "\n")
    with pytest.raises(DataError, match="last message must be the assistant"):
        read_chats(bad)
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": 3}]}) + "\n")
    with pytest.raises(DataError, match="role, content"):
        read_chats(bad)


def test_shot_prompts_are_scored_whole(model_and_task, chats):
    """k-shot prompts run past the training max_length; the baseline scores them uncut (the system prompt and
    the first shot included), and the task's own max_length comes back after."""
    model, task = model_and_task
    shot_row = chats.with_shots(pick_shots(chats, 4, 0))[5]
    whole = task.prompt_ids(shot_row["messages"])
    assert len(whole) > task.max_length
    with whole_prompts(task, model):
        assert task.collate([shot_row])["prompts"][0] == whole
    assert task.max_length == 64 and len(task.collate([shot_row])["prompts"][0]) < len(whole)


def test_a_run_reports_baselines_and_both_scorings(tmp_path):
    config = RunConfig.from_flat(dict(model="tiny-llama", task="instruct", data="vader:movies", max_train_samples=64,
                                      max_eval_samples=24, max_steps=3, per_device_train_batch_size=8,
                                      baselines=True, shots=2, output_dir=str(tmp_path / "run"), disable_tqdm=True))
    results = train_run(config)
    test_labels = load_data("vader:movies", "instruct").test.select(24).labels
    majority = max(test_labels.count(0), test_labels.count(1)) / 24
    for prefix in ("test", "zero_shot_test", "2_shot_test"):
        assert results[f"{prefix}_majority_class_rate"] == pytest.approx(majority)
        for metric in ("accuracy", "generation_accuracy", "unparseable"):
            assert 0 <= results[f"{prefix}_{metric}"] <= 1
    assert results["validation_loss"] > 0 and "validation_accuracy" in results
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["zero_shot_test_accuracy"] == results["zero_shot_test_accuracy"]
    kept = json.loads((tmp_path / "run" / "baselines.json").read_text())  # a resumed run reads these back
    assert kept == {k: v for k, v in results.items() if k.startswith(("zero_shot_", "2_shot_", "baseline_"))}
    assert results["baseline_seconds"] > 0 and results["final_test_seconds"] > 0


def test_a_reply_is_decided_once_its_label_word_is_whole(model_and_task):
    """The stopping rule never changes what `parse` reads: a row stops only after a whole choice word."""
    task = model_and_task[1]
    replies = ["the sentiment is positive.", "the sentiment is positive", "positively", "neutral, I think", "negative!"]
    assert [task._decided(r) for r in replies] == [True, False, False, False, True]
