"""Referee: transformers' ``ModelTesterMixin`` on tiny DistilBert models (see conftest.py)."""

import unittest

from referee_testers import DistilBertTester
from transformers import DistilBertForMaskedLM, DistilBertForSequenceClassification, DistilBertModel
from transformers_upstream_tests.test_modeling_common import ModelTesterMixin


class DistilBertRefereeTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (DistilBertModel, DistilBertForSequenceClassification, DistilBertForMaskedLM)

    def setUp(self):
        self.model_tester = DistilBertTester(self)
