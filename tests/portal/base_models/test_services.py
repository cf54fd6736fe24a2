import dataclasses

import pytest

from engine_daemon.peft_format import describe_base_model
from portal.adapters import services as adapter_services
from portal.base_models.errors import BaseModelError
from portal.base_models.selectors import base_model_for_upload
from portal.base_models.services import base_model_register
from tests.portal import factories

pytestmark = pytest.mark.django_db
TINY = describe_base_model("random:tiny")


def test_registering_again_updates_in_place():
    first = base_model_register(descriptor=TINY)
    again = base_model_register(descriptor=TINY)
    assert first.pk == again.pk and again.model_descriptor == TINY
    assert again.fingerprint == TINY.fingerprint and again.descriptor["projections"]["q_proj"] == [64, 64]


def test_a_name_cannot_change_architecture_under_its_adapters(tenant_a, peft_zip):
    base = base_model_register(descriptor=TINY)
    wider = dataclasses.replace(TINY, hidden_size=128)
    assert base_model_register(descriptor=wider).fingerprint == wider.fingerprint  # no adapters yet: fine
    base = base_model_register(descriptor=TINY)
    adapter_services.adapter_create(tenant=tenant_a[0], name="a", base_model=base, upload=factories.archive_upload(peft_zip))
    with pytest.raises(BaseModelError, match="serve the new model under another name"):
        base_model_register(descriptor=wider)


def test_the_base_model_of_an_upload():
    with pytest.raises(BaseModelError, match="no base model is registered"):
        base_model_for_upload(name=None)
    tiny = base_model_register(descriptor=TINY)
    assert base_model_for_upload(name=None) == tiny
    base_model_register(descriptor=dataclasses.replace(TINY, name="other"))
    with pytest.raises(BaseModelError, match="several base models"):
        base_model_for_upload(name=None)
    assert base_model_for_upload(name="random:tiny") == tiny
