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


def test_receiver_limits_have_defaults_and_max_pdu_0_means_the_ceiling():
    settings = load_settings({})
    assert settings.max_pdu_size == 128 * 1024
    assert (settings.scp_request_timeout, settings.scp_idle_timeout) == (10.0, 60.0)
    assert (settings.scp_max_associations, settings.scp_max_connections_per_address) == (100, 32)
    assert load_settings({"SCP_MAX_PDU": "0"}).max_pdu_size == 16 * 1024 * 1024


def test_receiver_tls_needs_a_port_a_certificate_and_a_key(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("x"), key.write_text("x")
    settings = load_settings({"SCP_TLS_PORT": "2762", "SCP_TLS_CERT_FILE": str(cert), "SCP_TLS_KEY_FILE": str(key)})
    assert settings.scp_tls_port == 2762 and settings.scp_tls_ca_file is None and not settings.scp_tls_only


@pytest.mark.parametrize("env, message", [
    ({"SCP_PORT": "http"}, "SCP_PORT"),
    ({"SCP_PORT": "70000"}, "SCP_PORT"),
    ({"DELETE_ON_POST": "maybe"}, "DELETE_ON_POST"),
    ({"SCP_AE_TITLE": "A" * 17}, "SCP_AE_TITLE"),
    ({"STORAGE": "s3"}, "S3_BUCKET"),
    ({"LATE_INSTANCE_POLICY": "drop"}, "LATE_INSTANCE_POLICY"),
    ({"CERT_FILE": "/nonexistent/ca.pem"}, "CERT_FILE"),
    ({"SCP_MAX_PDU": "100"}, "SCP_MAX_PDU"),
    ({"SCP_MAX_PDU": str(64 * 1024 * 1024)}, "SCP_MAX_PDU"),  # more than one connection may make us buffer
    ({"SCP_TLS_ONLY": "true"}, "SCP_TLS_PORT"),
    ({"SCP_TLS_PORT": "2762"}, "SCP_TLS_CERT_FILE"),
    ({"SCP_TLS_PORT": "11112"}, "SCP_TLS_PORT"),  # the plain port's
    ({"SCP_MAX_ASSOCIATIONS": "0"}, "SCP_MAX_ASSOCIATIONS"),
])
def test_bad_settings_name_the_variable(env, message):
    with pytest.raises(ConfigError, match=message):
        load_settings(env)
