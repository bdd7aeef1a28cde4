import pytest

from relay.config import ConfigError, load_settings
from relay.uids import InvalidUID, SeriesKey, is_valid_uid, parse_instance_key, require_uid


@pytest.mark.parametrize("uid", ["1.2.3", "1.2.840.10008.5.1.4.1.1.2", "0", "1." + "2" * 62])
def test_valid_uids(uid):
    assert is_valid_uid(uid)


@pytest.mark.parametrize("uid", ["", "1..2", ".1", "1.", "1.2/3", "../1", "1.2.a", "1 2",
                                 "1." + "2" * 63, None, 12])
def test_invalid_uids(uid):
    assert not is_valid_uid(uid)


def test_require_uid_strips_dicom_padding_and_names_the_attribute():
    assert require_uid("SOPInstanceUID", "1.2.3\x00") == "1.2.3"
    with pytest.raises(InvalidUID, match="SeriesInstanceUID"):
        require_uid("SeriesInstanceUID", "1.2/../3")


def test_instance_keys_round_trip_and_reject_anything_else():
    key = SeriesKey("1.2.3", "1.2.840.10008.5.1.4.1.1.2")
    assert parse_instance_key(key.instance_key("9.8")) == (key, "9.8")
    assert SeriesKey.from_slug(key.slug) == key
    for other in ["state/series/x.json", "series/1/2/3.txt", "series/1/2/../3.dcm", "series/1/3.dcm"]:
        assert parse_instance_key(other) is None


def test_settings_use_the_original_relays_names_and_defaults():
    settings = load_settings({})
    assert (settings.post_interval, settings.post_after, settings.delete_on_post) == (1.0, 10.0, True)
    assert (settings.get_interval, settings.get_timeout, settings.post_timeout) == (15.0, 86400.0, 60.0)
    assert settings.ask_inference_server_to_delete_task is True
    settings = load_settings({"POST_AFTER": "3", "DELETE_ON_POST": "False", "SCP_PORT": "104",
                              "SCP_ALLOWED_AE_TITLES": "CT1, MR2"})
    assert (settings.post_after, settings.delete_on_post, settings.scp_port) == (3.0, False, 104)
    assert settings.allowed_calling_ae_titles == ("CT1", "MR2")


def test_the_receivers_poll_interval_reaches_each_association():
    from types import SimpleNamespace

    from pynetdicom import AE
    from pynetdicom.association import Association

    from relay.dicom.network import set_poll_interval

    assert load_settings({}).scp_poll_interval == 0.0002
    assert load_settings({"SCP_POLL_INTERVAL": "0.001"}).scp_poll_interval == 0.001
    association = Association(AE(), "acceptor")  # the installed pynetdicom still has the knob
    assert association.dul._run_loop_delay == 0.001
    set_poll_interval(association, 0.0002)
    assert association.dul._run_loop_delay == 0.0002
    set_poll_interval(SimpleNamespace(dul=SimpleNamespace()), 0.0002)  # a pynetdicom without the knob


@pytest.mark.parametrize("env, message", [
    ({"SCP_PORT": "http"}, "SCP_PORT"),
    ({"SCP_PORT": "70000"}, "SCP_PORT"),
    ({"DELETE_ON_POST": "maybe"}, "DELETE_ON_POST"),
    ({"SCP_AE_TITLE": "A" * 17}, "SCP_AE_TITLE"),
    ({"STORAGE": "s3"}, "S3_BUCKET"),
    ({"LATE_INSTANCE_POLICY": "drop"}, "LATE_INSTANCE_POLICY"),
    ({"CERT_FILE": "/nonexistent/ca.pem"}, "CERT_FILE"),
    ({"SCP_POLL_INTERVAL": "0"}, "SCP_POLL_INTERVAL"),  # a busy loop would eat a core per association
])
def test_bad_settings_name_the_variable(env, message):
    with pytest.raises(ConfigError, match=message):
        load_settings(env)
