"""The special token ids, fixed for every vocabulary megabranch trains (sentencepiece is trained with them, and
imported vocabularies are remapped onto them): the one place the data layer and the model read them from."""

PAD, UNK, BOS, EOS = 0, 1, 2, 3
