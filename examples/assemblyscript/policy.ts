// The example policy in AssemblyScript (built with `--runtime stub`):
// - requests under the `limited-prefix` parameter (default "/api/") are
//   rate-limited per client by the `per-client` limiter: 429 + Retry-After;
// - requests whose URL has a query bypass the cache;
// - responses get `x-policy: assemblyscript`.

@external("cistern", "request_get")
declare function request_get(field: i32, out: usize, cap: i32): i32;
@external("cistern", "header_set")
declare function header_set(target: i32, name: usize, nameLen: i32, value: usize, valueLen: i32): i32;
@external("cistern", "cache_set")
declare function cache_set(op: i32, value: i64): i32;
@external("cistern", "respond")
declare function respond(status: i32, body: usize, bodyLen: i32): i32;
@external("cistern", "limiter_check")
declare function limiter_check(name: usize, nameLen: i32, key: usize, keyLen: i32): i32;
@external("cistern", "param_get")
declare function param_get(name: usize, nameLen: i32, index: i32, out: usize, cap: i32): i32;

const FIELD_PATH = 2;
const FIELD_QUERY = 3;
const FIELD_CLIENT_IP = 6;
const TARGET_RESPONSE = 1;
const CACHE_UNCACHEABLE = 0;

// Static buffers: nothing is allocated per request, so a reused instance's
// memory does not grow (the stub runtime never frees).
const PATH_CAP = 2048;
const PATH = memory.data(PATH_CAP);
const PREFIX_CAP = 256;
const PREFIX = memory.data(PREFIX_CAP);
const IP_CAP = 64;
const IP = memory.data(IP_CAP);
const DIGITS = memory.data(12);

// UTF-8 constants, encoded once at instantiation.
const LIMITED_PREFIX = String.UTF8.encode("limited-prefix");
const DEFAULT_PREFIX = String.UTF8.encode("/api/");
const PER_CLIENT = String.UTF8.encode("per-client");
const RETRY_AFTER = String.UTF8.encode("retry-after");
const RATE_LIMITED = String.UTF8.encode("rate limited\n");
const X_POLICY = String.UTF8.encode("x-policy");
const LANGUAGE = String.UTF8.encode("assemblyscript");

function ptr(buf: ArrayBuffer): usize {
  return changetype<usize>(buf);
}

function startsWith(s: usize, sLen: i32, p: usize, pLen: i32): bool {
  if (pLen > sLen) return false;
  for (let i = 0; i < pLen; i++) {
    if (load<u8>(s + i) != load<u8>(p + i)) return false;
  }
  return true;
}

export function cistern_abi_version(): i32 {
  return 1;
}

export function on_request(): i32 {
  if (request_get(FIELD_QUERY, PATH, 0) >= 0) {
    cache_set(CACHE_UNCACHEABLE, 0);
  }
  const pathLen = request_get(FIELD_PATH, PATH, PATH_CAP);
  if (pathLen < 0 || pathLen > PATH_CAP) return 0;
  let prefix = PREFIX;
  let prefixLen = param_get(ptr(LIMITED_PREFIX), LIMITED_PREFIX.byteLength, 0, PREFIX, PREFIX_CAP);
  if (prefixLen < 0 || prefixLen > PREFIX_CAP) {
    prefix = ptr(DEFAULT_PREFIX);
    prefixLen = DEFAULT_PREFIX.byteLength;
  }
  if (!startsWith(PATH, pathLen, prefix, prefixLen)) return 0;

  const ipLen = request_get(FIELD_CLIENT_IP, IP, IP_CAP);
  if (ipLen < 0 || ipLen > IP_CAP) return 1;
  const wait = limiter_check(ptr(PER_CLIENT), PER_CLIENT.byteLength, IP, ipLen);
  if (wait < 0) return 1;
  if (wait > 0) {
    let n = wait;
    let i = 12;
    do {
      i--;
      store<u8>(DIGITS + i, 48 + (n % 10));
      n /= 10;
    } while (n > 0);
    header_set(TARGET_RESPONSE, ptr(RETRY_AFTER), RETRY_AFTER.byteLength, DIGITS + i, 12 - i);
    respond(429, ptr(RATE_LIMITED), RATE_LIMITED.byteLength);
  }
  return 0;
}

export function on_response(): i32 {
  return header_set(TARGET_RESPONSE, ptr(X_POLICY), X_POLICY.byteLength, ptr(LANGUAGE), LANGUAGE.byteLength) < 0 ? 1 : 0;
}
