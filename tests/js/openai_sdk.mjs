// The official `openai` npm SDK against a PAD server: `baseURL` swapped,
// PAD's fields (`preference`, `pad`) passed as plain extra body params
// (the SDK sends unknown params as they are). Usage:
//   node openai_sdk.mjs http://127.0.0.1:8000/v1 [case ...]
import OpenAI from "openai";
import { zodResponseFormat, zodTextFormat } from "openai/helpers/zod";
import { z } from "zod";
import { API_KEY, MODEL, PREFERENCE, QUESTION, attempt, baseURL, runCases } from "./lib.mjs";

const client = new OpenAI({ baseURL: baseURL(), apiKey: API_KEY, maxRetries: 0 });
const ask = [{ role: "user", content: QUESTION }];
const weather = {
  type: "function",
  function: {
    name: "get_weather",
    description: "The weather in a city",
    parameters: {
      type: "object",
      properties: { city: { type: "string", enum: ["Paris", "Rome"] } },
      required: ["city"],
      additionalProperties: false,
    },
    strict: true,
  },
};
const verdictSchema = {
  type: "object",
  properties: { ok: { type: "boolean" }, color: { type: "string", enum: ["red", "blue"] } },
  required: ["ok", "color"],
  additionalProperties: false,
};

const cases = {
  async chat_create() {
    const answer = await client.chat.completions.create({
      model: MODEL, messages: ask, max_tokens: 5, n: 2, seed: 7,
      preference: PREFERENCE, pad: { weight: 2.0, top_k: 40 },
    });
    return {
      object: answer.object, id: answer.id, usage: answer.usage, pad: answer.pad,
      choices: answer.choices.map((c) => ({ index: c.index, content: c.message.content, role: c.message.role,
                                            finish_reason: c.finish_reason })),
    };
  },

  async chat_stream() {
    const stream = await client.chat.completions.create({
      model: MODEL, messages: ask, max_tokens: 5, n: 2, seed: 7, stream: true,
      stream_options: { include_usage: true }, preference: PREFERENCE, pad: { weight: 2.0, top_k: 40 },
    });
    const content = {}, finish = {};
    let pad = null, usage = null, chunks = 0, usageChunks = 0, ids = new Set();
    for await (const chunk of stream) {
      chunks += 1;
      ids.add(chunk.id);
      if (chunk.pad && pad === null) pad = { chunk: chunks, ...chunk.pad };
      if (chunk.usage) { usage = chunk.usage; usageChunks += 1; }
      for (const choice of chunk.choices) {
        content[choice.index] = (content[choice.index] ?? "") + (choice.delta?.content ?? "");
        if (choice.finish_reason) finish[choice.index] = choice.finish_reason;
      }
    }
    return { content, finish, pad, usage, chunks, usage_chunks: usageChunks, ids: ids.size };
  },

  async chat_json_schema() {
    const answer = await client.chat.completions.create({
      model: MODEL, messages: [{ role: "user", content: "Is the sky blue? Answer as JSON." }], max_tokens: 60,
      temperature: 0, preference: PREFERENCE,
      response_format: { type: "json_schema", json_schema: { name: "verdict", schema: verdictSchema, strict: true } },
    });
    const choice = answer.choices[0];
    return { content: choice.message.content, parsed: JSON.parse(choice.message.content),
             finish_reason: choice.finish_reason };
  },

  async chat_parse_zod() {
    const Verdict = z.object({ ok: z.boolean(), color: z.enum(["red", "blue"]) });
    const answer = await client.chat.completions.parse({
      model: MODEL, messages: [{ role: "user", content: "Is the sky blue? Answer as JSON." }], max_tokens: 60,
      temperature: 0, response_format: zodResponseFormat(Verdict, "verdict"),
    });
    return { parsed: answer.choices[0].message.parsed, finish_reason: answer.choices[0].finish_reason };
  },

  async chat_forced_tool() {
    const answer = await client.chat.completions.create({
      model: MODEL, messages: [{ role: "user", content: "Weather in Paris?" }], max_tokens: 60, temperature: 0,
      tools: [weather], tool_choice: { type: "function", function: { name: "get_weather" } },
      parallel_tool_calls: false, preference: PREFERENCE,
    });
    const choice = answer.choices[0];
    return {
      finish_reason: choice.finish_reason, content: choice.message.content,
      tool_calls: choice.message.tool_calls.map((call) => ({ id: call.id, type: call.type, name: call.function.name,
                                                             arguments: JSON.parse(call.function.arguments) })),
    };
  },

  async chat_forced_tool_stream() {
    const stream = await client.chat.completions.create({
      model: MODEL, messages: [{ role: "user", content: "Weather in Paris?" }], max_tokens: 60, temperature: 0,
      tools: [weather], tool_choice: "required", parallel_tool_calls: false, stream: true,
    });
    const calls = {};
    let finish = null;
    for await (const chunk of stream) {
      for (const choice of chunk.choices) {
        for (const call of choice.delta?.tool_calls ?? []) {
          const held = (calls[call.index] ??= { id: null, name: "", arguments: "" });
          held.id = call.id ?? held.id;
          held.name += call.function?.name ?? "";
          held.arguments += call.function?.arguments ?? "";
        }
        finish = choice.finish_reason ?? finish;
      }
    }
    return { finish_reason: finish,
             tool_calls: Object.values(calls).map((c) => ({ ...c, arguments: JSON.parse(c.arguments) })) };
  },

  // The SDK's streaming helper: events, and the whole completion assembled from the chunks.
  async chat_stream_helper() {
    const runner = client.chat.completions.stream({
      model: MODEL, messages: ask, max_tokens: 6, temperature: 0, preference: PREFERENCE,
      stream_options: { include_usage: true },
    });
    let deltas = "";
    runner.on("content", (delta) => { deltas += delta; });
    const final = await runner.finalChatCompletion();
    return { deltas, content: final.choices[0].message.content, finish_reason: final.choices[0].finish_reason,
             usage: final.usage ?? null };
  },

  // The streaming helper on a forced call: the call's deltas assembled, its
  // arguments parsed against the strict function's schema.
  async chat_stream_helper_tool() {
    const runner = client.chat.completions.stream({
      model: MODEL, messages: [{ role: "user", content: "Weather in Paris?" }], max_tokens: 60, temperature: 0,
      tools: [weather], tool_choice: { type: "function", function: { name: "get_weather" } },
      parallel_tool_calls: false,
    });
    const done = [];
    runner.on("tool_calls.function.arguments.done", (event) => done.push({ name: event.name,
                                                                            parsed: event.parsed_arguments }));
    const final = await runner.finalChatCompletion();
    const call = final.choices[0].message.tool_calls[0];
    return { done, finish_reason: final.choices[0].finish_reason, name: call.function.name,
             parsed_arguments: call.function.parsed_arguments };
  },

  // runTools: a named tool_choice makes the runner call the function once and stop.
  async chat_run_tools() {
    const called = [];
    const runner = client.chat.completions.runTools({
      model: MODEL, messages: [{ role: "user", content: "Weather in Paris?" }], max_tokens: 60, temperature: 0,
      tool_choice: { type: "function", function: { name: "get_weather" } },
      tools: [{
        type: "function",
        function: {
          name: "get_weather", parameters: weather.function.parameters, parse: JSON.parse,
          function: (args) => { called.push(args); return `sunny in ${args.city}`; },
        },
      }],
    });
    const messages = [];
    runner.on("message", (message) => messages.push(message.role));
    await runner.done();
    return { called, roles: messages, final_function_output: await runner.finalFunctionToolCallResult() };
  },

  // tools with tool_choice left at its default ("auto"): the model chooses
  // calls or text; the tiny random model talks.
  async chat_tool_choice_auto() {
    const answer = await client.chat.completions.create({ model: MODEL, messages: ask, max_tokens: 4,
                                                          temperature: 0, tools: [weather] });
    const choice = answer.choices[0];
    return { finish_reason: choice.finish_reason, content: choice.message.content,
             tool_calls: choice.message.tool_calls ?? null };
  },

  async responses_create() {
    const response = await client.responses.create({
      model: MODEL, input: QUESTION, instructions: "Answer briefly.", max_output_tokens: 6, temperature: 0,
      preference: PREFERENCE, pad: { weight: 2.0 }, store: false, metadata: { team: "docs" },
    });
    return { object: response.object, status: response.status, output_text: response.output_text,
             incomplete_details: response.incomplete_details, usage: response.usage, pad: response.pad,
             output_types: response.output.map((item) => item.type) };
  },

  async responses_stream() {
    const stream = await client.responses.create({
      model: MODEL, input: [{ role: "user", content: QUESTION }], max_output_tokens: 6, temperature: 0,
      preference: PREFERENCE, stream: true,
    });
    const types = [], sequence = [];
    let deltas = "", created = null, terminal = null;
    for await (const event of stream) {
      types.push(event.type);
      sequence.push(event.sequence_number);
      if (event.type === "response.created") created = event.response;
      if (event.type === "response.output_text.delta") deltas += event.delta;
      if (event.type === "response.completed" || event.type === "response.incomplete") terminal = event.response;
    }
    return { types, sequence, deltas, created_pad: created?.pad ?? null, terminal_status: terminal?.status,
             terminal_text: terminal?.output?.[0]?.content?.[0]?.text, usage: terminal?.usage };
  },

  // The Responses streaming helper and structured output through text.format.
  async responses_stream_helper() {
    const stream = client.responses.stream({
      model: MODEL, input: "Is the sky blue? Answer as JSON.", max_output_tokens: 60, temperature: 0,
      text: { format: { type: "json_schema", name: "verdict", schema: verdictSchema, strict: true } },
    });
    let deltas = "";
    stream.on("response.output_text.delta", (event) => { deltas += event.delta; });
    const final = await stream.finalResponse();
    return { deltas, status: final.status, output_text: final.output_text, parsed: JSON.parse(final.output_text) };
  },

  // A second turn as the Responses docs show it: the first answer's output
  // items sent back in input, then the user's next message; then the same
  // turn chained with previous_response_id, read back, its input items listed.
  async responses_multi_turn() {
    const first = await client.responses.create({ model: MODEL, input: QUESTION, max_output_tokens: 4,
                                                  temperature: 0 });
    const second = await client.responses.create({
      model: MODEL, max_output_tokens: 4, temperature: 0,
      input: [{ role: "user", content: QUESTION }, ...first.output, { role: "user", content: "Shorter?" }],
    });
    // the same turn chained onto the kept first response (store defaults to true)
    const chained = await client.responses.create({ model: MODEL, max_output_tokens: 4, temperature: 0,
                                                    previous_response_id: first.id, input: "Shorter?" });
    const retrieved = await client.responses.retrieve(chained.id);
    const items = [];
    for await (const item of client.responses.inputItems.list(chained.id, { limit: 1 })) items.push(item);
    await client.responses.delete(first.id);
    return { first: first.output_text, second: second.output_text, status: second.status,
             input_tokens: [first.usage.input_tokens, second.usage.input_tokens],
             chained: chained.output_text, chained_input_tokens: chained.usage.input_tokens,
             chained_previous: chained.previous_response_id, first_id: first.id,
             retrieved_same: JSON.stringify(retrieved) === JSON.stringify(chained),
             input_items: items.map((item) => [item.type, item.role, item.content[0].text]) };
  },

  async responses_parse_zod() {
    const Verdict = z.object({ ok: z.boolean(), color: z.enum(["red", "blue"]) });
    const response = await client.responses.parse({
      model: MODEL, input: "Is the sky blue? Answer as JSON.", max_output_tokens: 60, temperature: 0,
      text: { format: zodTextFormat(Verdict, "verdict") },
    });
    return { status: response.status, output_parsed: response.output_parsed };
  },

  async responses_stream_tool() {
    const stream = client.responses.stream({
      model: MODEL, input: "Weather in Paris?", max_output_tokens: 60, temperature: 0, parallel_tool_calls: false,
      tools: [{ type: "function", ...weather.function }], tool_choice: "required",
    });
    const types = [];
    stream.on("event", (event) => types.push(event.type));
    const final = await stream.finalResponse();
    const call = final.output.find((item) => item.type === "function_call");
    return { types: [...new Set(types)], status: final.status, name: call?.name,
             arguments: call ? JSON.parse(call.arguments) : null };
  },

  async responses_forced_tool() {
    const response = await client.responses.create({
      model: MODEL, input: "Weather in Paris?", max_output_tokens: 60, temperature: 0,
      tools: [{ type: "function", ...weather.function }], tool_choice: { type: "function", name: "get_weather" },
      parallel_tool_calls: false,
    });
    return { status: response.status,
             calls: response.output.filter((item) => item.type === "function_call")
               .map((item) => ({ name: item.name, call_id: item.call_id, arguments: JSON.parse(item.arguments) })) };
  },

  async completions_create() {
    const answer = await client.completions.create({
      model: MODEL, prompt: ["The capital of France is", "Sleep well by"], max_tokens: 4, temperature: 0,
      preference: PREFERENCE,
    });
    return { object: answer.object, usage: answer.usage, pad: answer.pad,
             choices: answer.choices.map((c) => ({ index: c.index, text: c.text, finish_reason: c.finish_reason })) };
  },

  async completions_stream() {
    const stream = await client.completions.create({
      model: MODEL, prompt: "The capital of France is", max_tokens: 4, temperature: 0, stream: true,
      stream_options: { include_usage: true },
    });
    let text = "", usage = null, finish = null;
    for await (const chunk of stream) {
      text += chunk.choices[0]?.text ?? "";
      finish = chunk.choices[0]?.finish_reason ?? finish;
      usage = chunk.usage ?? usage;
    }
    return { text, usage, finish_reason: finish };
  },

  async models() {
    const listed = [];
    for await (const model of client.models.list()) listed.push(model);
    const retrieved = await client.models.retrieve(MODEL);
    return { listed: listed.map((m) => ({ id: m.id, object: m.object, owned_by: m.owned_by })),
             retrieved: { id: retrieved.id, object: retrieved.object, reward_models: retrieved.reward_models } };
  },

  // Errors: each as the SDK surfaces it (class, status, and the OpenAI error body's fields).
  async errors() {
    const refusal = (request) => attempt(request, (error) => ({
      status: error.status, code: error.code, param: error.param, type: error.type, message: error.message,
      request_id: error.requestID ?? null }));
    return {
      unknown_parameter: await refusal(() => client.chat.completions.create({ model: MODEL, messages: ask, bogus: 1 })),
      stream_bad_request: await refusal(async () => {
        const stream = await client.chat.completions.create({ model: MODEL, messages: ask, stream: true, n: 0 });
        for await (const _ of stream);
      }),
      model_not_found: await refusal(() => client.chat.completions.create({ model: "gpt-nope", messages: ask })),
      retrieve_not_found: await refusal(() => client.models.retrieve("gpt-nope")),
      responses_previous_id: await refusal(() => client.responses.create({
        model: MODEL, input: QUESTION, previous_response_id: "resp_123" })),
    };
  },
};

await runCases(cases);
