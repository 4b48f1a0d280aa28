// The Vercel AI SDK (`ai` + `@ai-sdk/openai`) against a PAD server:
// `openai.chat(model)` speaks Chat Completions, `openai(model)` the
// Responses API. The provider has no pass-through for unknown body fields
// (its providerOptions are parsed against OpenAI's own), so PAD's
// `preference` / `pad` go in through the provider's `fetch` hook. Usage:
//   node ai_sdk.mjs http://127.0.0.1:8000/v1 [case ...]
import { createOpenAI } from "@ai-sdk/openai";
import { Output, generateObject, generateText, stepCountIs, streamObject, streamText, tool } from "ai";
import { z } from "zod";
import { API_KEY, MODEL, PREFERENCE, QUESTION, attempt, baseURL, runCases } from "./lib.mjs";

// Adds `extra` to every JSON request body; records the bodies sent, so the
// tests can check what the SDK asked for.
const sent = [];
function withBody(extra) {
  return async (url, init) => {
    const body = init?.body ? { ...JSON.parse(init.body), ...extra } : undefined;
    if (body) sent.push({ url: String(url), body });
    return fetch(url, body ? { ...init, body: JSON.stringify(body) } : init);
  };
}

const openai = createOpenAI({ baseURL: baseURL(), apiKey: API_KEY,
                              fetch: withBody({ preference: PREFERENCE, pad: { weight: 2.0 } }) });
const plain = createOpenAI({ baseURL: baseURL(), apiKey: API_KEY });
const recording = createOpenAI({ baseURL: baseURL(), apiKey: API_KEY, fetch: withBody({}) });
const Verdict = z.object({ ok: z.boolean(), color: z.enum(["red", "blue"]) });
const settings = { maxOutputTokens: 6, temperature: 0, maxRetries: 0 };

function lastSent() {
  const { url, body } = sent.at(-1) ?? {};
  return { url, keys: body ? Object.keys(body).sort() : [] };
}

// A streamText result read whole; `pad` from the raw chunks (includeRawChunks:
// the first chat chunk carries it, the Responses stream's response.created).
async function streamed(result) {
  let text = "", pad = null;
  const parts = [];
  for await (const part of result.fullStream) {
    parts.push(part.type);
    if (part.type === "text-delta") text += part.text;
    if (part.type === "raw") pad ??= part.rawValue?.pad ?? part.rawValue?.response?.pad ?? null;
    if (part.type === "error") throw part.error;
  }
  return { text, pad, parts: [...new Set(parts)], finishReason: await result.finishReason,
           usage: await result.usage };
}

function weatherTool(called = []) {
  return tool({ description: "The weather in a city", inputSchema: z.object({ city: z.enum(["Paris", "Rome"]) }),
                execute: async ({ city }) => { called.push(city); return `sunny in ${city}`; } });
}

async function streamedTool(model) {
  const result = streamText({ model, prompt: "Weather in Paris?", maxOutputTokens: 60, temperature: 0,
                              maxRetries: 0, tools: { get_weather: weatherTool() }, toolChoice: "required",
                              providerOptions: { openai: { parallelToolCalls: false } } });
  const parts = [];
  for await (const part of result.fullStream) {
    parts.push(part.type);
    if (part.type === "error") throw part.error;
  }
  return { parts: [...new Set(parts)], finishReason: await result.finishReason,
           toolCalls: (await result.toolCalls).map((c) => ({ toolName: c.toolName, input: c.input })),
           toolResults: (await result.toolResults).map((r) => r.output) };
}

const cases = {
  async chat_generate_text() {
    const result = await generateText({ model: openai.chat(MODEL), prompt: QUESTION, ...settings });
    return { text: result.text, finishReason: result.finishReason, usage: result.usage,
             pad: result.response.body?.pad ?? null, sent: lastSent() };
  },

  async chat_stream_text() {
    const result = streamText({ model: openai.chat(MODEL), prompt: QUESTION, ...settings, includeRawChunks: true });
    return { ...(await streamed(result)), sent: lastSent() };
  },

  async responses_generate_text() {
    const result = await generateText({ model: openai(MODEL), system: "Answer briefly.", prompt: QUESTION,
                                        ...settings });
    return { text: result.text, finishReason: result.finishReason, usage: result.usage,
             pad: result.response.body?.pad ?? null, sent: lastSent() };
  },

  async responses_stream_text() {
    const result = streamText({ model: openai(MODEL), system: "Answer briefly.", prompt: QUESTION, ...settings,
                                includeRawChunks: true });
    return { ...(await streamed(result)), sent: lastSent() };
  },

  // openai.completion(model): legacy /v1/completions (the SDK writes the chat as a "user: ... assistant:" prompt).
  async completion_stream_text() {
    const result = streamText({ model: openai.completion(MODEL), prompt: QUESTION, ...settings });
    return { ...(await streamed(result)), sent: lastSent() };
  },

  // Structured outputs: generateObject (response_format json_schema on chat,
  // text.format on Responses) and generateText's Output.object.
  async chat_generate_object() {
    const result = await generateObject({ model: openai.chat(MODEL), schema: Verdict, prompt: "Is the sky blue?",
                                          maxOutputTokens: 60, temperature: 0, maxRetries: 0 });
    return { object: result.object, finishReason: result.finishReason, sent: lastSent() };
  },

  async responses_generate_object() {
    const result = await generateObject({ model: openai(MODEL), schema: Verdict, prompt: "Is the sky blue?",
                                          maxOutputTokens: 60, temperature: 0, maxRetries: 0 });
    return { object: result.object, finishReason: result.finishReason, sent: lastSent() };
  },

  async responses_output_object() {
    const result = await generateText({ model: openai(MODEL), output: Output.object({ schema: Verdict }),
                                        prompt: "Is the sky blue?", maxOutputTokens: 60, temperature: 0,
                                        maxRetries: 0 });
    return { output: result.output, finishReason: result.finishReason };
  },

  // Tools with the SDK's default toolChoice ("auto"): the model chooses
  // calls or text (the tiny random model talks), on both APIs.
  async default_tool_choice() {
    const ask = async (model) => {
      const result = await generateText({ model, prompt: "Weather in Paris?", maxOutputTokens: 4, temperature: 0,
                                          maxRetries: 0, tools: { get_weather: weatherTool() } });
      return { finishReason: result.finishReason, text: result.text, toolCalls: result.toolCalls.length,
               sent: sent.at(-1).body.tool_choice ?? null };
    };
    return { chat: await ask(recording.chat(MODEL)), responses: await ask(recording(MODEL)) };
  },

  // A forced tool call, run by the SDK (one step: the default stopWhen).
  async chat_forced_tool() {
    const called = [];
    const result = await generateText({
      model: openai.chat(MODEL), prompt: "Weather in Paris?", maxOutputTokens: 60, temperature: 0, maxRetries: 0,
      tools: { get_weather: weatherTool(called) }, toolChoice: { type: "tool", toolName: "get_weather" },
      providerOptions: { openai: { parallelToolCalls: false } },
    });
    return { finishReason: result.finishReason, called,
             toolCalls: result.toolCalls.map((c) => ({ toolName: c.toolName, input: c.input })),
             toolResults: result.toolResults.map((r) => r.output) };
  },

  // "required" on the Responses API, then a second step that sends the call
  // and its result back (function_call / function_call_output items) with
  // the SDK's default toolChoice ("auto"): the tiny random model answers
  // text. parallelToolCalls false: one call (the random model would go on
  // calling until max tokens).
  async responses_tool_round_trip() {
    const result = await generateText({
      model: plain(MODEL), prompt: "Weather in Paris?", maxOutputTokens: 60, temperature: 0, maxRetries: 0,
      tools: { get_weather: weatherTool() }, toolChoice: "required", stopWhen: stepCountIs(2),
      prepareStep: ({ stepNumber }) => (stepNumber > 0 ? { toolChoice: "auto", maxOutputTokens: 4 } : {}),
      providerOptions: { openai: { parallelToolCalls: false } },
    });
    return { steps: result.steps.map((step) => ({ finishReason: step.finishReason,
                                                  toolCalls: step.toolCalls.map((c) => ({ toolName: c.toolName,
                                                                                          input: c.input })),
                                                  toolResults: step.toolResults.map((r) => r.output),
                                                  text: step.text })) };
  },

  async chat_stream_tool() {
    return streamedTool(openai.chat(MODEL));
  },

  async responses_stream_tool() {
    return streamedTool(openai(MODEL));
  },

  // A conversation's second turn on the Responses API: the SDK sends the
  // earlier answer as an item_reference (its default, store: true), or, with
  // store: false, as the message itself. At temperature 0 both must answer
  // the same: the reference resolved to that very answer.
  async responses_multi_turn() {
    const messages = [{ role: "user", content: QUESTION }];
    const first = await generateText({ model: plain(MODEL), messages, maxOutputTokens: 4, temperature: 0,
                                       maxRetries: 0 });
    messages.push(...first.response.messages, { role: "user", content: "Shorter?" });
    const turn = (providerOptions) => generateText({ model: recording(MODEL), messages, maxOutputTokens: 4,
                                                     temperature: 0, maxRetries: 0, providerOptions });
    const referenced = await turn(undefined);
    const referencedInput = sent.at(-1).body.input;
    const inline = await turn({ openai: { store: false } });
    const inlineInput = sent.at(-1).body.input;
    return { first: first.text, referenced: referenced.text, inline: inline.text,
             referenced_types: referencedInput.map((item) => item.type ?? item.role),
             inline_types: inlineInput.map((item) => item.type ?? item.role) };
  },

  // A server-side conversation (providerOptions.openai.conversation): each
  // turn sends only its new message, and the server reads the rest from the
  // conversation, so the second turn answers as the whole conversation sent
  // inline does (store: false, every message).
  async responses_conversation() {
    const headers = { "content-type": "application/json", authorization: `Bearer ${API_KEY}` };
    const conversation = await (await fetch(`${baseURL()}/conversations`, { method: "POST", headers,
                                                                          body: "{}" })).json();
    const options = { openai: { conversation: conversation.id } };
    const turn = (messages, providerOptions) => generateText({ model: recording(MODEL), messages,
                                                               maxOutputTokens: 4, temperature: 0, maxRetries: 0,
                                                               providerOptions });
    const first = await turn([{ role: "user", content: QUESTION }], options);
    const second = await turn([{ role: "user", content: "Shorter?" }], options);
    const secondInput = sent.at(-1).body.input;
    const inline = await turn([{ role: "user", content: QUESTION }, { role: "assistant", content: first.text },
                               { role: "user", content: "Shorter?" }], { openai: { store: false } });
    const items = await (await fetch(`${baseURL()}/conversations/${conversation.id}/items?order=asc`,
                                     { headers })).json();
    return { first: first.text, second: second.text, inline: inline.text,
             second_input: secondInput.map((item) => item.type ?? item.role),
             items: items.data.map((item) => [item.role, item.content[0].text]) };
  },

  async stream_object() {
    const result = streamObject({ model: openai.chat(MODEL), schema: Verdict, prompt: "Is the sky blue?",
                                  maxOutputTokens: 60, temperature: 0, maxRetries: 0 });
    const partials = [];
    for await (const partial of result.partialObjectStream) partials.push(partial);
    return { object: await result.object, partials: partials.length };
  },

  // Errors as the SDK surfaces them: APICallError with the status and the body.
  async errors() {
    const refusal = (request) => attempt(request, (error) => ({
      status: error.statusCode, message: error.message, retryable: error.isRetryable,
      body: error.responseBody ? JSON.parse(error.responseBody) : null }));
    return {
      chat_model_not_found: await refusal(() => generateText({ model: plain.chat("gpt-nope"), prompt: QUESTION,
                                                              maxRetries: 0 })),
      responses_model_not_found: await refusal(() => generateText({ model: plain("gpt-nope"), prompt: QUESTION,
                                                                   maxRetries: 0 })),
    };
  },
};

await runCases(cases);
