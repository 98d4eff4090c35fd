"""SIPp scenarios for the SIP edge: a customer's phone that dials an access number and
keys in its code by SIP INFO, and an agent's phone that answers, is busy or never
answers. Used by the tests and to place a call by hand:

    python -m accessline_server.sipedge.scenarios caller --code 1234 > caller.xml
    sipp -sf caller.xml -s +33130000001 127.0.0.1:5060 -m 1
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

_HEAD = """<?xml version="1.0" encoding="ISO-8859-1" ?>
<!DOCTYPE scenario SYSTEM "sipp.dtd">
<scenario name="{name}">
"""
_DIALOG = """      From: <sip:{caller}@[local_ip]:[local_port]>;tag=[call_number]
      To: <sip:[service]@[remote_ip]:[remote_port]>{peer_tag}
      Call-ID: [call_id]"""
_SDP = """
      v=0
      o=accessline 53655765 2353687637 IN IP[local_ip_type] [local_ip]
      s=-
      c=IN IP[media_ip_type] [media_ip]
      t=0 0
      m=audio [media_port] RTP/AVP 0
      a=rtpmap:0 PCMU/8000"""


def _dialog(caller: str, in_dialog: bool) -> str:
    return _DIALOG.format(caller=caller, peer_tag="[peer_tag_param]" if in_dialog else "")


def _send(lines: str, retrans: bool = False) -> str:
    attribute = ' retrans="500"' if retrans else ""
    return f"  <send{attribute}>\n    <![CDATA[\n{lines}\n    ]]>\n  </send>\n"


def _invite_branch(scenario: str) -> str:
    """The INVITE's branch for a message appended to `scenario` (a CANCEL, the ACK of a
    refusal): SIPp numbers branches by message index, the INVITE's is the first."""
    elements = sum(scenario.count(tag) for tag in ("<send", "<recv", "<pause"))
    return f"[branch-{elements}]"


def _request(
    start: str,
    caller_id: str,
    cseq: str,
    *,
    in_dialog: bool,
    via: str = "Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]",
    headers: Sequence[str] = (),
    body: tuple[str, str] | None = None,
) -> str:
    """One request of the caller's: its first line, Via, dialog headers (the peer's tag
    once `in_dialog`), CSeq, `headers`, and a body (content type, text) if any."""
    lines = [f"      {start}", f"      {via}", _dialog(caller_id, in_dialog), f"      CSeq: {cseq}"]
    lines += [f"      {header}" for header in headers]
    lines.append("      Max-Forwards: 70")
    if body is None:
        lines.append("      Content-Length: 0")
    else:
        lines += [f"      Content-Type: {body[0]}", "      Content-Length: [len]", body[1]]
    return "\n".join(lines)


_CONTACT = "Contact: <sip:caller@[local_ip]:[local_port]>"


def caller(
    code: str,
    *,
    caller_id: str = "+33612345678",
    privacy: str = "",
    expect: int = 200,
    hang_up_after_ms: int = 0,
    dtmf_type: str = "application/dtmf-relay",
    headers: Sequence[str] = (),
) -> str:
    """A customer's phone: INVITE to the number given with `-s`, each digit of `code`
    as one INFO in the early dialog of the 183, then either the agent's 200 (ACK, a
    moment of talk, BYE), the refusal `expect`, or a CANCEL after `hang_up_after_ms`."""
    extra = [_CONTACT, *([f"Privacy: {privacy}"] if privacy else []), *headers]
    out = _HEAD.format(name="accessline-caller")
    invite = "INVITE sip:[service]@[remote_ip]:[remote_port] SIP/2.0"
    sdp = ("application/sdp", _SDP)
    out += _send(
        _request(invite, caller_id, "1 INVITE", in_dialog=False, headers=extra, body=sdp),
        retrans=True,
    )
    out += '  <recv response="100" optional="true"/>\n'
    # Without a code to key in, the 183 is not needed (Kamailio alone sends none).
    optional = "true" if code == "" else "false"
    out += f'  <recv response="183" rrs="true" optional="{optional}"/>\n'
    in_dialog = ["[routes]", _CONTACT]
    for cseq, digit in enumerate(code, start=2):
        text = (
            f"\n      Signal={digit}\n      Duration=160"
            if dtmf_type.endswith("relay")
            else f"\n      {digit}"
        )
        info = _request(
            "INFO [next_url] SIP/2.0",
            caller_id,
            f"{cseq} INFO",
            in_dialog=True,
            headers=in_dialog,
            body=(dtmf_type, text),
        )
        out += _send(info)
        out += '  <recv response="200"/>\n'
    if hang_up_after_ms:
        out += f'  <pause milliseconds="{hang_up_after_ms}"/>\n'
        via = f"Via: SIP/2.0/[transport] [local_ip]:[local_port];branch={_invite_branch(out)}"
        cancel = "CANCEL sip:[service]@[remote_ip]:[remote_port] SIP/2.0"
        out += _send(_request(cancel, caller_id, "1 CANCEL", in_dialog=False, via=via))
        # The INVITE's 487 and the CANCEL's 200 come in either order.
        out += '  <recv response="200" optional="true"/>\n'
        expect = 487
    if expect != 200:
        # A phone may have rung before the refusal.
        out += '  <recv response="180" optional="true"/>\n'
        out += f'  <recv response="{expect}"/>\n'
        # The ACK of a refusal is the INVITE's transaction's: its Via (as the refusal
        # carries it back), the peer's tag.
        ack = "ACK sip:[service]@[remote_ip]:[remote_port] SIP/2.0"
        out += _send(_request(ack, caller_id, "1 ACK", in_dialog=True, via="[last_Via:]"))
        return out + "</scenario>\n"
    out += '  <recv response="180" optional="true"/>\n'
    out += '  <recv response="183" optional="true"/>\n'
    out += '  <recv response="200" rrs="true"/>\n'
    out += _send(
        _request("ACK [next_url] SIP/2.0", caller_id, "1 ACK", in_dialog=True, headers=in_dialog)
    )
    out += '  <pause milliseconds="200"/>\n'
    bye = _request(
        "BYE [next_url] SIP/2.0",
        caller_id,
        f"{len(code) + 2} BYE",
        in_dialog=True,
        headers=in_dialog,
    )
    out += _send(bye)
    out += '  <recv response="200"/>\n'
    return out + "</scenario>\n"


def _reply(status: str, *, dialog: bool = True, sdp: bool = False) -> str:
    """The agent phone's answer to the request it received last; `dialog`: it carries
    the phone's tag, the route set and its Contact (a provisional or final INVITE answer
    that sets up the dialog)."""
    lines = [f"      SIP/2.0 {status}", "      [last_Via:]", "      [last_From:]"]
    lines.append("      [last_To:];tag=[pid]agent[call_number]" if dialog else "      [last_To:]")
    lines += ["      [last_Call-ID:]", "      [last_CSeq:]"]
    if dialog:
        lines.append("      [last_Record-Route:]")
        lines.append("      Contact: <sip:agent@[local_ip]:[local_port]>")
    if sdp:
        lines += ["      Content-Type: application/sdp", "      Content-Length: [len]", _SDP]
    else:
        lines.append("      Content-Length: 0")
    return _send("\n".join(lines), retrans=sdp)


REFUSALS = {486: "486 Busy Here", 603: "603 Decline", 480: "480 Temporarily Unavailable"}


def agent(answer: int = 200) -> str:
    """An agent's phone: rings, then answers (200: talk until the caller's BYE), refuses
    with `answer` (486, 603, 480), or never answers (0)."""
    out = _HEAD.format(name="accessline-agent-phone")
    out += '  <recv request="INVITE" crlf="true"/>\n'
    out += _reply("180 Ringing")
    if answer == 0:
        out += '  <recv request="CANCEL"/>\n'
    elif answer != 200:
        out += _reply(REFUSALS[answer])
        out += '  <recv request="ACK"/>\n'
    else:
        out += _reply("200 OK", sdp=True)
        out += '  <recv request="ACK" crlf="true"/>\n'
        out += '  <recv request="BYE"/>\n'
        out += _reply("200 OK", dialog=False)
    return out + "</scenario>\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="phone", required=True)
    call = sub.add_parser("caller", help="a customer's phone")
    call.add_argument("--code", default="", help="the access code to key in")
    call.add_argument("--caller-id", default="+33612345678")
    call.add_argument("--privacy", default="", help="for example `id` to withhold the number")
    phone = sub.add_parser("agent", help="an agent's phone")
    phone.add_argument(
        "--answer", type=int, default=200, help="200, 486, 603, 480 or 0 (never answers)"
    )
    args = parser.parse_args(argv)
    if args.phone == "caller":
        print(caller(args.code, caller_id=args.caller_id, privacy=args.privacy), end="")
    else:
        print(agent(args.answer), end="")


if __name__ == "__main__":
    main()
