// Modal dialogs on <dialog>: the browser keeps focus inside, Escape cancels, and focus
// returns to the control that opened it.

import {h} from "./dom.js";

function open(dialog, firstFocus) {
  const opener = document.activeElement;
  document.body.append(dialog);
  dialog.showModal();
  firstFocus?.focus();
  return () => {
    dialog.close();
    dialog.remove();
    if (opener instanceof HTMLElement) opener.focus();
  };
}

/**
 * The one answer of an open dialog: the first call closes it and resolves ``value``; Escape
 * (the dialog's cancel event) answers ``cancelled``.
 */
function answerOnce(dialog, close, resolve, cancelled) {
  let answered = false;
  const answer = (value) => {
    if (answered) return;
    answered = true;
    close();
    resolve(value);
  };
  dialog.addEventListener("cancel", (e) => {
    e.preventDefault();
    answer(cancelled);
  });
  return answer;
}

/** Ask before doing something that loses data; resolves true to go ahead. */
export function confirmDialog({title, message, confirmLabel, danger = true}) {
  return new Promise((resolve) => {
    const cancel = h("button", {type: "button"}, "Cancel");
    const ok = h("button", {type: "button", class: danger ? "danger" : "primary"}, confirmLabel);
    const dialog = h("dialog", {"aria-labelledby": "dialog-title", class: "dialog"},
      h("h2", {id: "dialog-title"}, title),
      h("p", {}, message),
      h("div", {class: "dialog-buttons"}, cancel, ok));
    const close = open(dialog, cancel); // the safe choice has the focus
    const answer = answerOnce(dialog, close, resolve, false);
    cancel.addEventListener("click", () => answer(false));
    ok.addEventListener("click", () => answer(true));
  });
}

let fieldCount = 0;

function control(field) {
  const id = `field-${++fieldCount}`;
  let input;
  if (field.type === "select") {
    input = h("select", {id, name: field.name},
      field.options.map((o) => h("option", {value: o.value, selected: o.value === field.value},
        o.label ?? o.value)));
  } else if (field.type === "checkbox") {
    input = h("input", {id, name: field.name, type: "checkbox", checked: !!field.value});
  } else {
    input = h("input", {id, name: field.name, type: field.type || "text",
      value: field.value ?? "", required: field.required, placeholder: field.placeholder,
      pattern: field.pattern, min: field.min, max: field.max, step: field.step,
      autocomplete: "off"});
  }
  const help = field.help ? h("small", {id: `${id}-help`}, field.help) : null;
  if (help) input.setAttribute("aria-describedby", help.id);
  const row = field.type === "checkbox"
    ? h("div", {class: "field field-check"}, input, h("label", {for: id}, field.label), help)
    : h("div", {class: "field"}, h("label", {for: id}, field.label), input, help);
  return {row, input, field};
}

/**
 * A form in a dialog; resolves the values by field name (checkboxes as booleans, empty
 * text as null), or null when cancelled.
 */
export function formDialog({title, fields, submitLabel, danger = false, note}) {
  return new Promise((resolve) => {
    const controls = fields.map(control);
    const cancel = h("button", {type: "button"}, "Cancel");
    const submit = h("button", {type: "submit", class: danger ? "danger" : "primary"},
      submitLabel);
    const form = h("form", {method: "dialog"},
      h("h2", {id: "dialog-title"}, title),
      note ? h("p", {}, note) : null,
      controls.map((c) => c.row),
      h("div", {class: "dialog-buttons"}, cancel, submit));
    const dialog = h("dialog", {"aria-labelledby": "dialog-title", class: "dialog"}, form);
    const close = open(dialog, controls[0]?.input ?? submit);
    const answer = answerOnce(dialog, close, resolve, null);
    cancel.addEventListener("click", () => answer(null));
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      const values = {};
      for (const {input, field} of controls) {
        if (field.type === "checkbox") values[field.name] = input.checked;
        else if (field.type === "password") values[field.name] = input.value || null; // as typed
        else values[field.name] = input.value.trim() === "" ? null : input.value.trim();
      }
      answer(values);
    });
  });
}
