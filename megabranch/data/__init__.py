"""Data layer: SentencePiece tokenizer, memory-mapped binarized datasets, pair collation, token batching (for
training, and the deterministic batches every evaluation reads), multilingual directories (language tags,
temperature sampling)."""

from megabranch.data.batching import EpochBatchIterator, EpochIterator, make_batches
from megabranch.data.eval_batches import pair_batches, sentence_batches
from megabranch.data.indexed import IndexedDataset, IndexedDatasetBuilder, best_dtype
from megabranch.data.multilingual import MultilingualDataset, tag_of, temperature_probs
from megabranch.data.pair_dataset import LanguagePairDataset
from megabranch.data.splits import Split, load_split
from megabranch.data.tokenizer import BOS, EOS, PAD, UNK, Tokenizer, train_sentencepiece

__all__ = [
    "BOS", "EOS", "PAD", "UNK",
    "EpochBatchIterator", "EpochIterator", "IndexedDataset", "IndexedDatasetBuilder",
    "LanguagePairDataset", "MultilingualDataset", "Split", "Tokenizer", "best_dtype", "load_split", "make_batches",
    "pair_batches", "sentence_batches", "tag_of", "temperature_probs", "train_sentencepiece",
]

