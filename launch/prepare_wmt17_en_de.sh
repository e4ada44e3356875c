#!/usr/bin/env bash
# WMT17 English-German for launch/configs/base_*.yaml (the user brings the text; nothing is downloaded).
#
#   RAW=/data/wmt17_en_de bash launch/prepare_wmt17_en_de.sh          # -> data-bin/wmt17_en_de
#
# RAW holds plain (or .gz) parallel text, one sentence per line, aligned by line:
#   train.en train.de   (e.g. Europarl v7 + Common Crawl + News Commentary v12 + Rapid 2016, ~5.9M pairs)
#   valid.en valid.de   (newstest2016)      test.en test.de   (newstest2017)
# Untokenized text is fine: sentencepiece works on raw text (a joint 32k BPE, as the paper's joint vocabulary).
# DEST, VOCAB, MAX_LEN, WORKERS and INPUT_SENTENCE_SIZE (sentencepiece's training sample) override the defaults;
# OVERWRITE=1 replaces what DEST already holds.
set -euo pipefail
source "$(dirname "$0")/common.sh"
mb_prepare_wmt en de data-bin/wmt17_en_de 32000
