"""python-policy: a Switchyard plugin in Python, built with componentize-py for the `plugin-core`
world of wit/switchyard-plugin.wit.

Config (JSON from the host's [plugin.config] table):
    blocked_senders: list of sender addresses refused at MAIL FROM (550 5.7.1)
    tag: a value for the X-Policy header added to every accepted message
"""

import json

from wit_world import exports
from wit_world.imports import types
from componentize_py_types import Err


class Hooks(exports.Hooks):
    config = {}

    def init(self, config: str) -> types.PluginInfo:
        try:
            parsed = json.loads(config)
        except ValueError as error:
            raise Err(f"config is not JSON: {error}")
        if not isinstance(parsed.get("blocked_senders", []), list):
            raise Err("blocked_senders must be a list")
        Hooks.config = parsed
        return types.PluginInfo(hooks=["mail-from", "data"])

    def connect(self, session):
        return types.Verdict_Continue()

    def helo(self, session, name):
        return types.Verdict_Continue()

    def auth(self, session, mechanism, identity):
        return types.Verdict_Continue()

    def mail_from(self, session, sender, params):
        blocked = [address.lower() for address in Hooks.config.get("blocked_senders", [])]
        if sender.lower() in blocked:
            reply = types.Reply(code=550, enhanced="5.7.1", text=f"sender {sender} is blocked (python-policy)")
            return types.AddressDecision(verdict=types.Verdict_Reject(reply), rewrite=None)
        return types.AddressDecision(verdict=types.Verdict_Continue(), rewrite=None)

    def rcpt_to(self, session, envelope, recipient, params):
        return types.AddressDecision(verdict=types.Verdict_Continue(), rewrite=None)

    def data(self, session, envelope, auth, body):
        tag = Hooks.config.get("tag", "python")
        edit = types.Edit_AddHeader(types.Header(name="X-Policy", value=f"{tag}; {len(envelope.recipients)} recipient(s)"))
        return types.DataDecision(verdict=types.DataVerdict_Continue(), edits=[edit])

    def route(self, message, recipient):
        return types.NextHop_Continue()

    def delivery_result(self, report):
        return None

    def bounce(self, report):
        return None
