"""How the encode pipeline cuts texts into model calls: longest first, by count and by a token budget.

Texts are sorted by length (characters, longest first, as `SentenceTransformer.encode` does) and
cut into batches of at most `texts_per_call` texts and at most a token budget (`texts_per_call` x
BUDGET_TOKENS_PER_TEXT, estimated from characters), so that a batch of long texts is smaller than
one of short texts and the padding stays small.
"""
BUDGET_TOKENS_PER_TEXT = 128  # the token budget of a batch: texts_per_call texts of this many tokens
CHARS_PER_TOKEN = 3  # English WordPiece runs ~4 characters a token: this over-estimates a little


def estimated_tokens(text, max_length):
    """An upper estimate of the tokens `text` becomes, special tokens included."""
    return min(max_length, len(text) // CHARS_PER_TOKEN + 2)


def plan_batches(texts, texts_per_call, max_length, budget_tokens_per_text=BUDGET_TOKENS_PER_TEXT):
    """Lists of indices into `texts`: longest texts first, each batch at most `texts_per_call` texts
    and, padded to its longest text, at most `texts_per_call * budget_tokens_per_text` tokens."""
    budget = texts_per_call * budget_tokens_per_text
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    batches, current, longest = [], [], 0
    for index in order:
        tokens = estimated_tokens(texts[index], max_length)
        width = max(longest, tokens)
        if current and (len(current) == texts_per_call or width * (len(current) + 1) > budget):
            batches.append(current)
            current, width = [], tokens
        current.append(index)
        longest = width
    if current:
        batches.append(current)
    return batches
