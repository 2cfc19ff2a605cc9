"""How the encode pipeline cuts texts into batches: longest first, by count and by token budget."""
from embeddings.pipeline import estimated_tokens, plan_batches


def test_short_texts_make_full_batches_longest_first():
    texts = ["a" * n for n in (10, 40, 20, 30, 50)]
    assert plan_batches(texts, texts_per_call=2, max_length=512) == [[4, 1], [3, 2], [0]]


def test_long_texts_make_smaller_batches_within_the_token_budget():
    texts = ["x" * 3000] * 8 + ["short text"] * 8  # 512 tokens (truncated) and ~5 tokens
    batches = plan_batches(texts, texts_per_call=8, max_length=512, budget_tokens_per_text=128)
    assert [len(batch) for batch in batches] == [2, 2, 2, 2, 8]  # 8 x 128 = 1,024 tokens: two 512s a batch
    assert sorted(i for batch in batches for i in batch) == list(range(16))


def test_the_estimate_never_exceeds_the_model_limit():
    assert estimated_tokens("x" * 100_000, 512) == 512
    assert estimated_tokens("", 512) == 2
