"""Referee: transformers' ``ModelTesterMixin`` on tiny Bert models (see conftest.py), as an encoder and as a decoder."""

import unittest

from referee_testers import BertTester
from transformers import BertForMaskedLM, BertForSequenceClassification, BertLMHeadModel, BertModel
from transformers_upstream_tests.generation.test_utils import GenerationTesterMixin
from transformers_upstream_tests.test_modeling_common import ModelTesterMixin


class BertRefereeTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (BertModel, BertForMaskedLM, BertForSequenceClassification)

    def setUp(self):
        self.model_tester = BertTester(self)


class BertDecoderRefereeTest(ModelTesterMixin, GenerationTesterMixin, unittest.TestCase):
    """``BertLMHeadModel(is_decoder=True)`` on the encoder's inputs (masks with holes, random token types), as
    upstream's BERT generation tests run it: with a KV cache, generate() included (#30)."""

    all_model_classes = (BertLMHeadModel,)

    def setUp(self):
        self.model_tester = BertTester(self, is_decoder=True)
