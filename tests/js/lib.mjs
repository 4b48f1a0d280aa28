// Shared by the client scripts: the server's base URL (argv[2], or
// PAD_BASE_URL), its API key (PAD_API_KEY), the cases to run (argv[3...], default all), and one JSON
// object on stdout, {case: result | {error: {...}}}, for
// tests/test_js_clients.py to assert on. A case that throws is recorded,
// not fatal, so one incompatibility does not hide the others.

export const MODEL = process.env.PAD_MODEL ?? "smollm2-135m-instruct";
export const QUESTION = "How do I sleep better?";
export const PREFERENCE = "I like short answers with a bit of humour";
export const API_KEY = process.env.PAD_API_KEY ?? "unused"; // a key only if the server has --api-key

export function baseURL() {
  const url = process.argv[2] ?? process.env.PAD_BASE_URL;
  if (!url) {
    console.error("usage: node <script>.mjs http://127.0.0.1:8000/v1 [case ...]  (or PAD_BASE_URL)");
    process.exit(2);
  }
  return url;
}

// What the Python side needs from an error: the SDK's class and the
// OpenAI error body's fields, as each SDK exposes them.
export function describeError(error) {
  return {
    class: error?.constructor?.name,
    name: error?.name,
    message: String(error?.message ?? error),
    status: error?.status ?? error?.statusCode,
    code: error?.code ?? null,
    param: error?.param ?? null,
    type: error?.type ?? null,
    body: error?.error ?? error?.data ?? null,
    cause: error?.cause ? String(error.cause?.message ?? error.cause) : null,
  };
}

// A call expected to fail: {class: null} if it did not, else what
// `describe` (each SDK exposes its errors differently) reads off the error.
export async function attempt(call, describe) {
  try {
    await call();
    return { class: null };
  } catch (error) {
    return { class: error.constructor.name, ...describe(error) };
  }
}

export async function runCases(cases) {
  const asked = process.argv.slice(3);
  const names = asked.length ? asked : Object.keys(cases);
  const results = {};
  for (const name of names) {
    if (!(name in cases)) throw new Error(`no case ${name}; cases: ${Object.keys(cases).join(", ")}`);
    try {
      results[name] = await cases[name]();
    } catch (error) {
      results[name] = { error: describeError(error) };
    }
  }
  process.stdout.write(JSON.stringify(results) + "\n");
}
