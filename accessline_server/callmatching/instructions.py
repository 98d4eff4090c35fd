"""What the app is told of a handoff started: the number to call, the code to key in,
and both as the device can dial them and as the customer reads them."""

from __future__ import annotations

from accessline.callmatching.storage.v1 import storage_pb2 as cm_store
from accessline.callmatching.v1 import call_matching_pb2 as cm_pb2
from accessline_server.runtime.phone import display_number


def answer(session: cm_store.StoredSession, code: str) -> cm_pb2.StartHandoffResponse:
    """StartHandoff's answer for a stored session and its access code ("" without)."""
    number = session.reservation.number
    shown = display_number(number)
    dial = number
    if code and session.device_can_send_dtmf:
        dial = f"{number},,{code}#"
    text = f"Call {shown}"
    if code:
        text += f" and, when asked, key in {code} followed by #"
    display = cm_pb2.DisplayInstructions(number_display=shown, code_display=code, text=text + ".")
    return cm_pb2.StartHandoffResponse(
        session_id=session.session_id,
        access_number=number,
        access_code=code,
        expires_at=session.expires_at,
        dial_string=dial if session.device_can_dial else "",
        display=display,
    )
