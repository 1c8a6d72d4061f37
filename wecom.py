"""WeCom callbacks: the crypto (signature, AES), and the contact-change events they carry.

The server API client (tokens, members) is wecom_api.py."""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import struct
import time
from dataclasses import dataclass, field
from xml.etree.ElementTree import Element, fromstring
from wechatpy.crypto.cryptography import WeChatCipher
from wechatpy.enterprise.crypto import WeChatCrypto


MEMBER_CHANGES = ("create_user", "update_user", "delete_user")
_DIGITS = re.compile(r"[0-9]{1,12}")  # ASCII only: str.isdigit() accepts '²', which int() refuses
_SHA1_HEX = re.compile(r"[0-9a-fA-F]{40}")
# The one answer to every failure after a valid signature (padding, length, corp id, XML, UserID): a sender
# that could tell them apart would have an oracle on the ciphertext. The log line keeps the cause.
UNREADABLE = "callback cannot be decrypted or read"


class CallbackRejected(Exception):
    """A callback we refuse: `reason` is short and safe to log (no secrets); `public` is what the sender is
    told (the reason itself, except after a valid signature: UNREADABLE)."""

    def __init__(self, reason: str, status: int = 400, public: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.public = public or reason


def after_signature(exc: CallbackRejected) -> CallbackRejected:
    """The same refusal, answered as every failure after a valid signature is: 400 UNREADABLE."""
    return CallbackRejected(exc.reason, 400, public=UNREADABLE)


# --- callback crypto -------------------------------------------------------------------------

def signature(token: str, timestamp: str, nonce: str, encrypted: str) -> str:
    """WeCom msg_signature: sha1 hex over the four strings sorted."""
    return hashlib.sha1("".join(sorted([token, timestamp, nonce, encrypted])).encode()).hexdigest()


class CallbackCrypto:
    """Verify and decrypt (and, for `simulate` and tests, encrypt) WeCom callbacks.

    Signature first, in constant time, inside a timestamp window; XML only after that. wechatpy's
    own `check_signature`/`decrypt_message` compare with `!=`, parse before verifying and accept bad
    padding, so only its AES cipher and its encryptor are used here.
    """

    def __init__(self, token: str, encoding_aes_key: str, corp_id: str, max_skew: int = 300):
        self.token = token
        self.corp_id = corp_id
        self.max_skew = max_skew
        self._key = base64.b64decode(encoding_aes_key + "=")
        self._cipher = WeChatCipher(self._key)
        self._encryptor = WeChatCrypto(token, encoding_aes_key, corp_id)

    def precheck(self, msg_signature: str, timestamp: str, now: float | None = None) -> None:
        """What can be refused from the query alone, before the body is read: the timestamp is a number
        inside the replay window and the signature has the shape of a SHA-1 (40 hexadecimal digits)."""
        if not _DIGITS.fullmatch(timestamp):
            raise CallbackRejected("timestamp is not a number")
        now = time.time() if now is None else now
        if abs(now - int(timestamp)) > self.max_skew:
            raise CallbackRejected("timestamp outside the replay window")
        if not _SHA1_HEX.fullmatch(msg_signature):
            raise CallbackRejected("msg_signature is not 40 hexadecimal digits")

    def check(self, msg_signature: str, timestamp: str, nonce: str, encrypted: str,
              now: float | None = None) -> None:
        """Raise CallbackRejected unless the timestamp is fresh and the signature matches."""
        self.precheck(msg_signature, timestamp, now)
        expected = signature(self.token, timestamp, nonce, encrypted)
        if not hmac.compare_digest(expected.encode(), msg_signature.lower().encode("utf-8", "replace")):
            raise CallbackRejected("signature mismatch", status=403)

    def decrypt(self, encrypted: str) -> str:
        """Decrypt one `Encrypt` value, checking padding, length and the receive id."""
        try:
            raw = base64.b64decode(encrypted, validate=True)
        except (binascii.Error, ValueError):
            raise CallbackRejected("ciphertext is not base64") from None
        if not raw or len(raw) % 16:
            raise CallbackRejected("ciphertext length is not a whole number of AES blocks")
        plain = self._cipher.decrypt(raw)
        pad = plain[-1]
        if not 1 <= pad <= 32 or plain[-pad:] != bytes([pad]) * pad or len(plain) - pad < 20:
            raise CallbackRejected("ciphertext does not decrypt (wrong EncodingAESKey?)")
        content = plain[16:-pad]
        (length,) = struct.unpack(">I", content[:4])
        if length > len(content) - 4:
            raise CallbackRejected("ciphertext does not decrypt (wrong EncodingAESKey?)")
        try:
            message = content[4:4 + length].decode("utf-8")
            receive_id = content[4 + length:].decode("utf-8")
        except UnicodeDecodeError:
            raise CallbackRejected("ciphertext does not decrypt (wrong EncodingAESKey?)") from None
        if not hmac.compare_digest(receive_id.encode(), self.corp_id.encode()):
            raise CallbackRejected("message is for another corp id", status=403)
        return message

    def verify_url(self, msg_signature: str, timestamp: str, nonce: str, echostr: str) -> str:
        """The GET URL check: the decrypted echostr."""
        self.check(msg_signature, timestamp, nonce, echostr)
        try:
            return self.decrypt(echostr)
        except CallbackRejected as exc:
            raise after_signature(exc) from None

    def open_envelope(self, body: bytes, msg_signature: str, timestamp: str, nonce: str) -> str:
        """The POST event: the decrypted XML. Nothing of the body is parsed as XML before the signature holds.

        The signature covers the Encrypt value only, and nothing else of the envelope is used, so the value is
        cut out of the raw body (in linear time) rather than parsed: no XML parser ever sees an
        unauthenticated body. Only the decrypted, authenticated event is parsed (parse_event, DTDs refused).
        """
        if not body.strip():
            raise CallbackRejected("empty body")
        if b"<!DOCTYPE" in body or b"<!ENTITY" in body:
            raise CallbackRejected("XML with a DTD or entities is refused")
        encrypted = _encrypt_value(body)
        self.check(msg_signature, timestamp, nonce, encrypted)
        try:
            return self.decrypt(encrypted)
        except CallbackRejected as exc:
            raise after_signature(exc) from None

    def open_event(self, body: bytes, msg_signature: str, timestamp: str, nonce: str) -> tuple[str, ContactChange]:
        """The POST event: its decrypted XML and what it says (open_envelope, then parse_event, whose
        refusals come after the signature and are answered as such)."""
        xml = self.open_envelope(body, msg_signature, timestamp, nonce)
        try:
            return xml, parse_event(xml)
        except CallbackRejected as exc:
            raise after_signature(exc) from None

    def encrypt(self, message: str, timestamp: str | None = None, nonce: str | None = None) -> dict:
        """Encrypt and sign `message` as WeCom would: the query parameters and the POST body."""
        timestamp = timestamp or str(int(time.time()))
        nonce = nonce or str(int.from_bytes(os.urandom(4), "big"))
        reply = self._encryptor.encrypt_message(message, nonce, timestamp)
        encrypted = _text(parse_xml(reply.encode()), "Encrypt")
        query = {"msg_signature": signature(self.token, timestamp, nonce, encrypted),
                 "timestamp": timestamp, "nonce": nonce}
        body = (f"<xml><ToUserName><![CDATA[{self.corp_id}]]></ToUserName><AgentID><![CDATA[]]></AgentID>"
                f"<Encrypt><![CDATA[{encrypted}]]></Encrypt></xml>")
        return {"query": query, "body": body.encode(), "encrypted": encrypted}


def _encrypt_value(body: bytes) -> str:
    """The text of the envelope's one <Encrypt> element (CDATA or plain), without parsing the body."""
    count = body.count(b"<Encrypt>")
    if count > 1:
        raise CallbackRejected("more than one Encrypt element")
    start = body.find(b"<Encrypt>") + len(b"<Encrypt>")
    end = body.find(b"</Encrypt>", start)
    if count == 0 or end < 0:
        raise CallbackRejected("no Encrypt element")
    value = body[start:end].strip()
    if value.startswith(b"<![CDATA[") and value.endswith(b"]]>"):
        value = value[len(b"<![CDATA["):-len(b"]]>")].strip()
    if b"<" in value or b"&" in value or b"]]>" in value:
        raise CallbackRejected("Encrypt must hold plain base64 text")
    if not value:
        raise CallbackRejected("no Encrypt element")
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise CallbackRejected("Encrypt must hold plain base64 text") from None


def parse_xml(data: bytes | str) -> Element:
    """Parse XML with DTDs (so entities and external references) refused.

    Entities can only be declared in a DTD, and ElementTree fetches nothing external; so refusing the
    two markers in the decoded text is what defusedxml's forbid_dtd does, at a third of its cost (the
    parser is given that same text, which expat then reads as UTF-8 whatever its declaration says)."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
    except UnicodeDecodeError:
        raise CallbackRejected("body is not XML") from None
    if "<!DOCTYPE" in text or "<!ENTITY" in text:
        raise CallbackRejected("XML with a DTD or entities is refused")
    try:
        return fromstring(text)
    except Exception:  # ParseError and friends: anything that is not well-formed XML
        raise CallbackRejected("body is not XML") from None


def _text(root: Element, tag: str) -> str | None:
    node = root.find(tag)
    return None if node is None or node.text is None else node.text.strip()


# --- contact-change events --------------------------------------------------------------------

# Member fields of a contact event, by XML tag; `fields` of ContactChange keeps them in lower case.
MEMBER_FIELDS = ("UserID", "NewUserID", "Name", "Department", "MainDepartment", "IsLeaderInDept",
                 "DirectLeader", "Position", "Mobile", "Gender", "Email", "BizMail", "Status",
                 "Avatar", "Alias", "Telephone", "Address")


@dataclass(frozen=True)
class ContactChange:
    """One decrypted WeCom callback, reduced to what the service uses."""

    msg_type: str
    event: str
    change_type: str
    user_id: str
    create_time: int | None
    departments: tuple[int, ...] = ()
    fields: dict = field(default_factory=dict)

    @property
    def is_member_change(self) -> bool:
        return self.msg_type == "event" and self.event == "change_contact" and self.change_type in MEMBER_CHANGES

    @property
    def name(self) -> str:
        return self.fields.get("name", "")


def parse_event(xml: str) -> ContactChange:
    """Parse decrypted event XML; raise CallbackRejected when a member change lacks its UserID."""
    # One pass over the top-level elements (the first of each tag counts, as find() would have it).
    texts: dict[str, str | None] = {}
    for node in parse_xml(xml):
        texts.setdefault(node.tag, None if node.text is None else node.text.strip())
    msg_type = texts.get("MsgType") or ""
    event = texts.get("Event") or ""
    change_type = texts.get("ChangeType") or ""
    fields = {tag.lower(): texts[tag] for tag in MEMBER_FIELDS if texts.get(tag) is not None}
    create_time = texts.get("CreateTime")
    departments = tuple(int(d) for d in (fields.get("department") or "").split(",") if _DIGITS.fullmatch(d.strip()))
    change = ContactChange(
        msg_type=msg_type, event=event, change_type=change_type, user_id=fields.get("userid", ""),
        create_time=int(create_time) if create_time and _DIGITS.fullmatch(create_time) else None,
        departments=departments, fields=fields)
    if change.is_member_change and not change.user_id:
        raise CallbackRejected(f"{change_type} event without UserID")
    return change


def event_xml(change_type: str, user_id: str, corp_id: str, departments: str = "",
              create_time: int | None = None, name: str = "") -> str:
    """A contact-change event as WeCom sends it (for `simulate`, the demo, reconciliation and tests).

    Written by an XML writer, never by pasting values into CDATA: a name holding `]]>`, `<` or `&` stays
    that name (issue 24: a member called `]]>` made reconciliation's event unparseable). Characters XML 1.0
    cannot carry at all (most C0 controls) become U+FFFD, so the event always parses.
    """
    from xml.etree import ElementTree  # here, not at the top: this function is all of wecom.py issue 24 changes

    unsafe = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")  # what XML 1.0 cannot carry
    root = ElementTree.Element("xml")
    fields = [("ToUserName", corp_id), ("FromUserName", "sys"), ("CreateTime", str(create_time or int(time.time()))),
              ("MsgType", "event"), ("Event", "change_contact"), ("ChangeType", change_type), ("UserID", user_id)]
    if name:
        fields.append(("Name", name))
    if departments and change_type != "delete_user":
        fields.append(("Department", departments))
    for tag, value in fields:
        ElementTree.SubElement(root, tag).text = unsafe.sub("\ufffd", str(value))
    return ElementTree.tostring(root, encoding="unicode")
