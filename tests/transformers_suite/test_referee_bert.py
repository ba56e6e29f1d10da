"""Referee: transformers' ``ModelTesterMixin`` on tiny Bert models (see conftest.py)."""

import unittest

from referee_testers import BertTester
from transformers import BertForMaskedLM, BertForSequenceClassification, BertModel
from transformers_upstream_tests.test_modeling_common import ModelTesterMixin


class BertRefereeTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (BertModel, BertForMaskedLM, BertForSequenceClassification)

    def setUp(self):
        self.model_tester = BertTester(self)
