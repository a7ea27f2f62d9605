// js-policy: a Switchyard plugin in JavaScript, built with componentize-js (StarlingMonkey, from
// npm) for the `plugin-core` world of wit/switchyard-plugin.wit.
//
// Config (JSON from the host's [plugin.config] table):
//   blocked_recipients: recipient addresses refused at RCPT TO (550 5.1.1), case-insensitively
//   tag: a value for the X-JS-Policy header added to every accepted message
//
// WIT names become camelCase (mail-from: mailFrom); a variant is { tag, val }; an option is the
// value or undefined; a `result` error is thrown.

let config = { blocked_recipients: [], tag: "js" };

const carryOn = { tag: "continue" };

export const hooks = {
  init(text) {
    let parsed;
    try {
      parsed = JSON.parse(text);
    } catch (error) {
      throw `config is not JSON: ${error}`;
    }
    if (parsed.blocked_recipients !== undefined && !Array.isArray(parsed.blocked_recipients)) {
      throw "blocked_recipients must be a list";
    }
    config = {
      blocked_recipients: (parsed.blocked_recipients || []).map((address) => address.toLowerCase()),
      tag: parsed.tag || "js",
    };
    // The host calls only these.
    return { hooks: ["rcpt-to", "data"] };
  },

  connect(session) {
    return carryOn;
  },
  helo(session, name) {
    return carryOn;
  },
  auth(session, mechanism, identity) {
    return carryOn;
  },
  mailFrom(session, sender, params) {
    return { verdict: carryOn };
  },

  rcptTo(session, envelope, recipient, params) {
    if (config.blocked_recipients.includes(recipient.toLowerCase())) {
      const reply = { code: 550, enhanced: "5.1.1", text: `recipient ${recipient} is refused (js-policy)` };
      return { verdict: { tag: "reject", val: reply } };
    }
    return { verdict: carryOn };
  },

  data(session, envelope, auth, body) {
    const subject = body.headers().find((header) => header.name.toLowerCase() === "subject");
    const value = `${config.tag}; subject ${subject ? JSON.stringify(subject.value) : "none"}`;
    return {
      verdict: carryOn,
      edits: [{ tag: "add-header", val: { name: "X-JS-Policy", value } }],
    };
  },

  route(message, recipient) {
    return carryOn;
  },
  deliveryResult(report) {},
  bounce(report) {
    return undefined;
  },
};
