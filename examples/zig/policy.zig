//! The example policy in Zig (freestanding wasm32, no allocator):
//! - requests under the `limited-prefix` parameter (default "/api/") are
//!   rate-limited per client by the `per-client` limiter: 429 + Retry-After;
//! - requests whose URL has a query bypass the cache;
//! - responses get `x-policy: zig`.

const cistern = struct {
    extern "cistern" fn request_get(field: i32, out: [*]u8, cap: i32) i32;
    extern "cistern" fn header_set(target: i32, name: [*]const u8, name_len: i32, value: [*]const u8, value_len: i32) i32;
    extern "cistern" fn cache_set(op: i32, value: i64) i32;
    extern "cistern" fn respond(status: i32, body: [*]const u8, body_len: i32) i32;
    extern "cistern" fn limiter_check(name: [*]const u8, name_len: i32, key: [*]const u8, key_len: i32) i32;
    extern "cistern" fn param_get(name: [*]const u8, name_len: i32, index: i32, out: [*]u8, cap: i32) i32;
};

const FIELD_PATH = 2;
const FIELD_QUERY = 3;
const FIELD_CLIENT_IP = 6;
const TARGET_RESPONSE = 1;
const CACHE_UNCACHEABLE = 0;

var path_buf: [2048]u8 = undefined;
var prefix_buf: [256]u8 = undefined;
var ip_buf: [64]u8 = undefined;
var digits: [12]u8 = undefined;

fn len(s: []const u8) i32 {
    return @intCast(s.len);
}

/// Reads into `buf`; null when absent or too long.
fn fits(n: i32, buf: []u8) ?[]u8 {
    if (n < 0 or n > len(buf)) return null;
    return buf[0..@intCast(n)];
}

fn startsWith(s: []const u8, p: []const u8) bool {
    if (p.len > s.len) return false;
    for (p, 0..) |c, i| {
        if (s[i] != c) return false;
    }
    return true;
}

fn decimal(value: i32) []const u8 {
    var n: u32 = @intCast(value);
    var i: usize = digits.len;
    while (true) {
        i -= 1;
        digits[i] = '0' + @as(u8, @intCast(n % 10));
        n /= 10;
        if (n == 0) break;
    }
    return digits[i..];
}

export fn cistern_abi_version() i32 {
    return 1;
}

export fn on_request() i32 {
    if (cistern.request_get(FIELD_QUERY, &path_buf, 0) >= 0) {
        _ = cistern.cache_set(CACHE_UNCACHEABLE, 0);
    }
    const path = fits(cistern.request_get(FIELD_PATH, &path_buf, len(&path_buf)), &path_buf) orelse return 0;
    const param = "limited-prefix";
    const prefix: []const u8 = fits(cistern.param_get(param, len(param), 0, &prefix_buf, len(&prefix_buf)), &prefix_buf) orelse "/api/";
    if (!startsWith(path, prefix)) return 0;

    const ip = fits(cistern.request_get(FIELD_CLIENT_IP, &ip_buf, len(&ip_buf)), &ip_buf) orelse return 1;
    const limiter = "per-client";
    const wait = cistern.limiter_check(limiter, len(limiter), ip.ptr, len(ip));
    if (wait < 0) return 1;
    if (wait > 0) {
        const name = "retry-after";
        const value = decimal(wait);
        _ = cistern.header_set(TARGET_RESPONSE, name, len(name), value.ptr, len(value));
        const body = "rate limited\n";
        _ = cistern.respond(429, body, len(body));
    }
    return 0;
}

export fn on_response() i32 {
    const name = "x-policy";
    const value = "zig";
    return if (cistern.header_set(TARGET_RESPONSE, name, len(name), value, len(value)) < 0) 1 else 0;
}
