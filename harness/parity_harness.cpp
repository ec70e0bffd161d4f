// parity_harness: a small, deterministic driver for one llama.cpp-family engine.
//
// One request per process. The request is the command line; bulk data goes through files; one JSON
// status object is printed on stdout (nothing else is written to stdout), whatever happens short of
// the engine aborting the process. Engine logs go to stderr (warnings and errors only unless
// --verbose); the tail of the engine log is also kept in the JSON status when something fails.
//
// It speaks the lane protocol, version 1 (docs/lane-protocol.md; `info` reports "protocol": 1).
//
//   parity_harness info
//   parity_harness vocab    --model M --out VOCAB.tsv
//   parity_harness tokenize --model M --text-file T --add-special 0|1 --parse-special 0|1
//   parity_harness eval     --model M --ids-file IDS.i32 --out LOGITS.f32
//                           [--threads N] [--n-ctx N] [--n-batch N] [--n-ubatch N]
//                           [--type-k f32|f16] [--type-v f32|f16] [--v-f16-fallback 0|1]
//                           [--extra-bufts default|0|1] [--capture DIR]
//
// vocab output: a TSV with one line per token: id, attribute bits, base kind, hex of the token text as
// stored in the vocabulary, hex of its piece (llama_token_to_piece, special=true).
// eval input: little-endian int32 token ids; output: float32 row-major [n_tokens, n_vocab], row i =
// logits after ids[0..i], computed in ONE llama_decode call with every position marked as output,
// on a fresh context (cache cleared), flash attention off.
// --extra-bufts: llama_model_params.use_extra_bufts (weight repacking); "default" keeps the engine's
// default; llama.h generations without the field report "absent".
// --capture DIR (off by default): registers cb_eval for that one decode and records every node the
// graph evaluates (see "per-node capture" below) into DIR/capture.json + DIR/capture.f32. The
// decode itself is unchanged (same batch, threads and context parameters); the scheduler then
// computes the graph one node at a time.
//
// Exit codes (mapped by parity_both/lanes/harness.py):
//   0  ok
//   1  usage: malformed command line (a bug in the caller)
//   2  bad input: the model cannot be loaded (other than for lack of memory), an input file is
//      unreadable or malformed, a token id is outside the vocabulary, a setting cannot be honoured
//      (n_ctx below the sequence, a KV type) -> the pipeline's bad-input exit 2
//   3  engine failure: the engine failed a valid request (context creation, tokenize, decode, logits)
//   4  internal: out of memory (std::bad_alloc here, or llama.cpp's log says so when it fails to load
//      the model or create the context), an output cannot be written, any other exception
// Every failure prints {"ok": false, "exit_code": N, "stage": ..., "error": ...}.
//
// The llama.h generation is detected at configure time (CMake check_cxx_source_compiles) and
// handed in as PH_HAVE_* macros; the detected generation is reported in every status line.

#include "llama.h"

#include <link.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <exception>
#include <fstream>
#include <map>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#ifndef PH_HARNESS_VERSION
#define PH_HARNESS_VERSION "1"
#endif

namespace {

// ---------------------------------------------------------------- API generation (from probes)

#if defined(PH_HAVE_MODEL_GET_VOCAB)
const char * const kGeneration = "2025+";
#else
const char * const kGeneration = "2024-10";
#endif

std::vector<std::string> api_features() {
    std::vector<std::string> f;
#ifdef PH_HAVE_MODEL_GET_VOCAB
    f.push_back("llama_model_get_vocab");
#endif
#ifdef PH_HAVE_MODEL_LOAD_FROM_FILE
    f.push_back("llama_model_load_from_file");
#endif
#ifdef PH_HAVE_INIT_FROM_MODEL
    f.push_back("llama_init_from_model");
#endif
#ifdef PH_HAVE_MODEL_FREE
    f.push_back("llama_model_free");
#endif
#ifdef PH_HAVE_MEMORY_CLEAR
    f.push_back("llama_memory_clear");
#endif
#ifdef PH_HAVE_KV_SELF_CLEAR
    f.push_back("llama_kv_self_clear");
#endif
#ifdef PH_HAVE_KV_CACHE_CLEAR
    f.push_back("llama_kv_cache_clear");
#endif
#ifdef PH_HAVE_FLASH_ATTN_TYPE
    f.push_back("cparams.flash_attn_type");
#endif
#ifdef PH_HAVE_FLASH_ATTN_BOOL
    f.push_back("cparams.flash_attn");
#endif
#ifdef PH_HAVE_USE_EXTRA_BUFTS
    f.push_back("mparams.use_extra_bufts");
#endif
    return f;
}

// ---------------------------------------------------------------- JSON output

std::string json_escape(const std::string & s) {
    std::string out;
    out.reserve(s.size() + 2);
    out += '"';
    for (unsigned char c : s) {
        switch (c) {
            case '"': out += "\\\""; break;
            case '\\': out += "\\\\"; break;
            case '\n': out += "\\n"; break;
            case '\r': out += "\\r"; break;
            case '\t': out += "\\t"; break;
            default:
                if (c < 0x20 || c >= 0x7f) {
                    // bytes >= 0x80 are escaped one by one as \u00XX: the status line stays ASCII;
                    // the only free text here is log output and paths.
                    char buf[8];
                    std::snprintf(buf, sizeof buf, "\\u%04x", c);
                    out += buf;
                } else {
                    out += static_cast<char>(c);
                }
        }
    }
    out += '"';
    return out;
}

class Json {
  public:
    Json & str(const std::string & k, const std::string & v) { return raw(k, json_escape(v)); }
    Json & num(const std::string & k, long long v) { return raw(k, std::to_string(v)); }
    Json & dbl(const std::string & k, double v) {
        char buf[64];
        std::snprintf(buf, sizeof buf, "%.6f", v);
        return raw(k, buf);
    }
    Json & boolean(const std::string & k, bool v) { return raw(k, v ? "true" : "false"); }
    Json & strs(const std::string & k, const std::vector<std::string> & v) {
        std::string s = "[";
        for (size_t i = 0; i < v.size(); ++i) s += (i ? "," : "") + json_escape(v[i]);
        return raw(k, s + "]");
    }
    Json & ints(const std::string & k, const std::vector<llama_token> & v) {
        std::string s = "[";
        for (size_t i = 0; i < v.size(); ++i) s += (i ? "," : "") + std::to_string(v[i]);
        return raw(k, s + "]");
    }
    Json & raw(const std::string & k, const std::string & v) {
        body_ += (body_.empty() ? "" : ",") + json_escape(k) + ":" + v;
        return *this;
    }
    std::string dump() const { return "{" + body_ + "}"; }

  private:
    std::string body_;
};

// ---------------------------------------------------------------- engine log capture

struct LogState {
    bool verbose = false;
    std::deque<std::string> tail;
    std::string partial;
};
LogState g_log;

void log_callback(enum ggml_log_level level, const char * text, void * /*user_data*/) {
    if (text == nullptr) return;
    g_log.partial += text;
    size_t nl;
    while ((nl = g_log.partial.find('\n')) != std::string::npos) {
        g_log.tail.push_back(g_log.partial.substr(0, nl));
        if (g_log.tail.size() > 20) g_log.tail.pop_front();
        g_log.partial.erase(0, nl + 1);
    }
    if (g_log.verbose || level == GGML_LOG_LEVEL_WARN || level == GGML_LOG_LEVEL_ERROR) {
        std::fputs(text, stderr);
    }
}

std::vector<std::string> log_tail() {
    std::vector<std::string> v(g_log.tail.begin(), g_log.tail.end());
    if (!g_log.partial.empty()) v.push_back(g_log.partial);
    return v;
}

// ---------------------------------------------------------------- loaded libraries

int collect_lib(struct dl_phdr_info * info, size_t /*size*/, void * data) {
    auto * out = static_cast<std::vector<std::string> *>(data);
    if (info->dlpi_name == nullptr || info->dlpi_name[0] == '\0') return 0;
    std::string name = info->dlpi_name;
    const size_t slash = name.rfind('/');
    const std::string base = slash == std::string::npos ? name : name.substr(slash + 1);
    if (base.find("llama") != std::string::npos || base.find("ggml") != std::string::npos) {
        out->push_back(name);
    }
    return 0;
}

std::vector<std::string> loaded_engine_libraries() {
    std::vector<std::string> libs;
    dl_iterate_phdr(collect_lib, &libs);
    return libs;
}

// ---------------------------------------------------------------- failures

enum ExitCode : int { kOk = 0, kUsage = 1, kBadInput = 2, kEngine = 3, kInternal = 4 };

// The one exception type: every expected failure carries its exit code and the stage it happened in.
class HarnessError : public std::runtime_error {
  public:
    HarnessError(ExitCode code, std::string stage, const std::string & message)
        : std::runtime_error(message), code_(code), stage_(std::move(stage)) {}
    ExitCode code() const { return code_; }
    const std::string & stage() const { return stage_; }

  private:
    ExitCode code_;
    std::string stage_;
};

[[noreturn]] void fail(ExitCode code, const std::string & stage, const std::string & message) {
    throw HarnessError(code, stage, message);
}

Json base_status(const std::string & command) {
    Json j;
    j.str("harness_version", PH_HARNESS_VERSION)
        .str("command", command)
        .str("api_generation", kGeneration)
        .strs("api_features", api_features());
    return j;
}

// ---------------------------------------------------------------- RAII for C handles

struct FileCloser {
    void operator()(FILE * f) const {
        if (f != nullptr) std::fclose(f);
    }
};
using FilePtr = std::unique_ptr<FILE, FileCloser>;

FilePtr open_out(const std::string & path) {
    FilePtr f(std::fopen(path.c_str(), "wb"));
    if (!f) fail(kInternal, "io", "cannot write " + path);
    return f;
}

void close_out(FilePtr & f, const std::string & path) {
    FILE * raw = f.release();
    if (std::fclose(raw) != 0) fail(kInternal, "io", "cannot write " + path);
}

// A llama_batch that frees itself (llama_batch_init / llama_batch_free).
class Batch {
  public:
    explicit Batch(int32_t n_tokens) : batch_(llama_batch_init(n_tokens, 0, 1)) {}
    ~Batch() { llama_batch_free(batch_); }
    Batch(const Batch &) = delete;
    Batch & operator=(const Batch &) = delete;
    llama_batch & get() { return batch_; }

  private:
    llama_batch batch_;
};

// ---------------------------------------------------------------- arguments

struct Args {
    std::string command;
    std::map<std::string, std::string> opts;

    bool has(const std::string & k) const { return opts.count(k) != 0; }
    std::string get(const std::string & k, const std::string & dflt = "") const {
        auto it = opts.find(k);
        return it == opts.end() ? dflt : it->second;
    }
    long long get_int(const std::string & k, long long dflt) const {
        auto it = opts.find(k);
        if (it == opts.end()) return dflt;
        char * end = nullptr;
        const long long v = std::strtoll(it->second.c_str(), &end, 10);
        if (end == it->second.c_str() || *end != '\0') fail(kUsage, "args", "option --" + k + " needs an integer");
        return v;
    }
};

Args parse_args(int argc, char ** argv) {
    Args a;
    if (argc < 2) fail(kUsage, "args", "usage: parity_harness info|vocab|tokenize|eval [--opt value ...]");
    a.command = argv[1];
    for (int i = 2; i < argc; ++i) {
        std::string k = argv[i];
        if (k == "--verbose") {
            a.opts["verbose"] = "1";
            continue;
        }
        if (k.rfind("--", 0) != 0 || i + 1 >= argc) fail(kUsage, "args", "bad argument: " + k);
        a.opts[k.substr(2)] = argv[++i];
    }
    return a;
}

// ---------------------------------------------------------------- thin API shims

struct Engine {
    llama_model * model = nullptr;
    llama_context * ctx = nullptr;

    ~Engine() {
        if (ctx != nullptr) llama_free(ctx);
        if (model != nullptr) {
#ifdef PH_HAVE_MODEL_FREE
            llama_model_free(model);
#else
            llama_free_model(model);
#endif
        }
    }
};

// llama.cpp reports a failure as a null handle; when its log says memory ran out, that is an
// internal failure (exit 4), not bad input or an engine refusal.
void fail_if_out_of_memory(const std::string & stage) {
    for (const std::string & line : log_tail()) {
        if (line.find("bad_alloc") != std::string::npos || line.find("Cannot allocate memory") != std::string::npos) {
            fail(kInternal, stage, "out of memory (" + line + ")");
        }
    }
}

// llama_model_params.use_extra_bufts (weight repacking; 2025+ llama.h): "default" keeps the engine's
// default. Returns the JSON value used: true, false, or null when this llama.h has no such field.
std::string set_extra_bufts(llama_model_params & mp, const std::string & want) {
    if (want != "default" && want != "0" && want != "1") {
        fail(kUsage, "args", "--extra-bufts takes default, 0 or 1, not '" + want + "'");
    }
#ifdef PH_HAVE_USE_EXTRA_BUFTS
    if (want != "default") mp.use_extra_bufts = want == "1";
    return mp.use_extra_bufts ? "true" : "false";
#else
    (void)mp;
    if (want == "1") fail(kBadInput, "args", "this llama.h has no use_extra_bufts (no weight repacking)");
    return "null";
#endif
}

// Loads the model (CPU only); a model that cannot be loaded is bad input. Fills *extra_bufts with the
// use_extra_bufts value used (JSON).
llama_model * load_model(const std::string & path, bool vocab_only, const std::string & want_extra_bufts = "default",
                         std::string * extra_bufts = nullptr) {
    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    mp.vocab_only = vocab_only;
    const std::string used = set_extra_bufts(mp, want_extra_bufts);
    if (extra_bufts != nullptr) *extra_bufts = used;
#ifdef PH_HAVE_MODEL_LOAD_FROM_FILE
    llama_model * m = llama_model_load_from_file(path.c_str(), mp);
#else
    llama_model * m = llama_load_model_from_file(path.c_str(), mp);
#endif
    if (m == nullptr) {
        fail_if_out_of_memory("load_model");  // llama.cpp returns no model for any failure
        fail(kBadInput, "load_model", "cannot load model " + path);
    }
    return m;
}

#ifdef PH_HAVE_MODEL_GET_VOCAB
using VocabHandle = const llama_vocab *;
VocabHandle vocab_of(const llama_model * m) { return llama_model_get_vocab(m); }
int32_t n_vocab(VocabHandle v) { return llama_vocab_n_tokens(v); }
const char * token_text(VocabHandle v, llama_token t) { return llama_vocab_get_text(v, t); }
int token_attr(VocabHandle v, llama_token t) { return static_cast<int>(llama_vocab_get_attr(v, t)); }
llama_token bos_of(VocabHandle v) { return llama_vocab_bos(v); }
llama_token eos_of(VocabHandle v) { return llama_vocab_eos(v); }
bool add_bos_of(VocabHandle v) { return llama_vocab_get_add_bos(v); }
bool add_eos_of(VocabHandle v) { return llama_vocab_get_add_eos(v); }
#else
using VocabHandle = const llama_model *;
VocabHandle vocab_of(const llama_model * m) { return m; }
int32_t n_vocab(VocabHandle v) { return llama_n_vocab(v); }
const char * token_text(VocabHandle v, llama_token t) { return llama_token_get_text(v, t); }
int token_attr(VocabHandle v, llama_token t) { return static_cast<int>(llama_token_get_attr(v, t)); }
llama_token bos_of(VocabHandle v) { return llama_token_bos(v); }
llama_token eos_of(VocabHandle v) { return llama_token_eos(v); }
bool add_bos_of(VocabHandle v) { return llama_add_bos_token(v); }
bool add_eos_of(VocabHandle v) { return llama_add_eos_token(v); }
#endif

void clear_cache(llama_context * ctx) {
#if defined(PH_HAVE_MEMORY_CLEAR)
    llama_memory_clear(llama_get_memory(ctx), true);
#elif defined(PH_HAVE_KV_SELF_CLEAR)
    llama_kv_self_clear(ctx);
#else
    llama_kv_cache_clear(ctx);
#endif
}

void disable_flash_attn(llama_context_params & cp) {
#if defined(PH_HAVE_FLASH_ATTN_TYPE)
    cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
#else
    cp.flash_attn = false;
#endif
}

const char * kind_name(int attr) {
    // base kind from the attribute bits (LLAMA_TOKEN_ATTR_*), most specific first (the same order as
    // the llama-cpp-python lane); the flag bits above BYTE are reported separately (raw attr column)
    if (attr & LLAMA_TOKEN_ATTR_UNKNOWN) return "unknown";
    if (attr & LLAMA_TOKEN_ATTR_UNUSED) return "unused";
    if (attr & LLAMA_TOKEN_ATTR_CONTROL) return "control";
    if (attr & LLAMA_TOKEN_ATTR_USER_DEFINED) return "user_defined";
    if (attr & LLAMA_TOKEN_ATTR_BYTE) return "byte";
    if (attr & LLAMA_TOKEN_ATTR_NORMAL) return "normal";
    return "undefined";
}

std::string to_hex(const char * s, size_t n) {
    static const char * digits = "0123456789abcdef";
    std::string out;
    const unsigned char * p = reinterpret_cast<const unsigned char *>(s);
    for (size_t i = 0; i < n; ++i) {
        out += digits[p[i] >> 4];
        out += digits[p[i] & 15];
    }
    return out;
}

// The readable piece of one token (llama_token_to_piece, special tokens rendered, no lstrip).
std::string token_piece(VocabHandle v, llama_token t) {
    std::vector<char> buf(64);
    int32_t n = llama_token_to_piece(v, t, buf.data(), static_cast<int32_t>(buf.size()), 0, true);
    if (n < 0) {
        buf.resize(static_cast<size_t>(-n));
        n = llama_token_to_piece(v, t, buf.data(), static_cast<int32_t>(buf.size()), 0, true);
    }
    return n > 0 ? std::string(buf.data(), static_cast<size_t>(n)) : std::string();
}

std::string read_file(const std::string & path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) fail(kBadInput, "io", "cannot read " + path);
    std::ostringstream ss;
    ss << in.rdbuf();
    return ss.str();
}

ggml_type parse_type(const std::string & s) {
    if (s == "f32") return GGML_TYPE_F32;
    if (s == "f16") return GGML_TYPE_F16;
    fail(kBadInput, "args", "unsupported KV cache type '" + s + "' (use f32 or f16)");
}

const char * type_name(ggml_type t) { return t == GGML_TYPE_F32 ? "f32" : t == GGML_TYPE_F16 ? "f16" : "?"; }

double seconds_since(std::chrono::steady_clock::time_point t0) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// ---------------------------------------------------------------- per-node capture
//
// cb_eval is asked (ask=true) about every node of the graph and wants them all; it is then called
// (ask=false) once each node has been computed, in evaluation order. For each node it records its
// name, ggml_op_desc, type, ne, nb, op_params and sources (name, type, ne; "node" = index of an
// earlier captured node, else "leaf" = index into the saved leaves, or "weight": true) and its data
// converted to float32 in row-major order over ne, read through the strides nb. Sources that are
// neither captured nodes nor weights (inp_tokens, inp_pos, KQ_mask, KV cache, ...) are saved once, the
// first time a node reads them, as leaves. Weights (buffers marked GGML_BACKEND_BUFFER_USAGE_WEIGHTS)
// are never read. Output: DIR/capture.f32 (every saved array, concatenated float32) and
// DIR/capture.json ({"nodes": [...], "leaves": [...]}, "data": {"offset", "count"} in floats, or null
// for a type that is not converted). parity_both/lanes/capture.py turns it into the capture format;
// parity_both/lanes/llama_cpp_python.py applies the same rules through ctypes.

class Capture {
  public:
    explicit Capture(const std::string & dir) : dir_(dir), data_(open_out(dir + "/capture.f32")) {}

    bool active = false;

    // cb_eval; never throws into ggml: the first error is kept and reported after the decode.
    static bool callback(ggml_tensor * t, bool ask, void * user_data) {
        auto * c = static_cast<Capture *>(user_data);
        if (!c->active || !c->error_.empty()) return false;
        if (ask) return true;
        try {
            c->record_node(t);
        } catch (const std::exception & e) {
            c->error_ = e.what();
        }
        return true;
    }

    // Writes DIR/capture.json; returns the number of captured nodes.
    int finish(int32_t n_tokens) {
        if (!error_.empty()) fail(kInternal, "capture", "capture failed: " + error_);
        close_out(data_, dir_ + "/capture.f32");
        const std::string path = dir_ + "/capture.json";
        FilePtr out = open_out(path);
        Json j;
        j.str("format", "parity-harness/capture-raw/1").str("api_generation", kGeneration);
        j.num("n_tokens", n_tokens).str("data_file", "capture.f32").num("n_floats", static_cast<long long>(n_floats_));
        j.raw("nodes", "[" + nodes_json_ + "]").raw("leaves", "[" + leaves_json_ + "]");
        const std::string text = j.dump() + "\n";
        if (std::fwrite(text.data(), 1, text.size(), out.get()) != text.size()) fail(kInternal, "io", "cannot write " + path);
        close_out(out, path);
        return n_nodes_;
    }

    long long n_floats() const { return static_cast<long long>(n_floats_); }

  private:
    static std::string ints_json(const int64_t * v, int n) {
        std::string s = "[";
        for (int i = 0; i < n; ++i) s += (i ? "," : "") + std::to_string(v[i]);
        return s + "]";
    }

    static std::string ne_json(const ggml_tensor * t) { return ints_json(t->ne, GGML_MAX_DIMS); }

    static std::string nb_json(const ggml_tensor * t) {
        int64_t v[GGML_MAX_DIMS];
        for (int d = 0; d < GGML_MAX_DIMS; ++d) v[d] = static_cast<int64_t>(t->nb[d]);
        return ints_json(v, GGML_MAX_DIMS);
    }

    static bool is_weight(const ggml_tensor * t) {
        const ggml_tensor * base = t->view_src != nullptr ? t->view_src : t;
        return base->buffer != nullptr &&
               ggml_backend_buffer_get_usage(base->buffer) == GGML_BACKEND_BUFFER_USAGE_WEIGHTS;
    }

    // One element of a type converted to float32 (false: the type is not converted).
    static bool element(ggml_type type, const uint8_t * p, float * out) {
        switch (type) {
            case GGML_TYPE_F32: std::memcpy(out, p, 4); return true;
            case GGML_TYPE_F16: {
                ggml_fp16_t h;
                std::memcpy(&h, p, 2);
                *out = ggml_fp16_to_fp32(h);
                return true;
            }
            case GGML_TYPE_BF16: {
                uint16_t h;
                std::memcpy(&h, p, 2);
                const uint32_t bits = static_cast<uint32_t>(h) << 16;
                std::memcpy(out, &bits, 4);
                return true;
            }
            case GGML_TYPE_I8: *out = static_cast<float>(*reinterpret_cast<const int8_t *>(p)); return true;
            case GGML_TYPE_I16: {
                int16_t v;
                std::memcpy(&v, p, 2);
                *out = static_cast<float>(v);
                return true;
            }
            case GGML_TYPE_I32: {
                int32_t v;
                std::memcpy(&v, p, 4);
                *out = static_cast<float>(v);
                return true;
            }
            case GGML_TYPE_I64: {
                int64_t v;
                std::memcpy(&v, p, 8);
                *out = static_cast<float>(v);
                return true;
            }
            default: return false;
        }
    }

    // Appends the tensor's data as float32 to capture.f32; returns the JSON "data" value.
    std::string save(const ggml_tensor * t) {
        float probe;
        const uint8_t zero[8] = {};
        const ggml_tensor * base = t->view_src != nullptr ? t->view_src : t;
        if (base->buffer == nullptr || t->data == nullptr || is_weight(t) || !element(t->type, zero, &probe)) {
            return "null";
        }
        const size_t nbytes = ggml_nbytes(t);
        const int64_t count = t->ne[0] * t->ne[1] * t->ne[2] * t->ne[3];
        raw_.resize(nbytes);
        if (nbytes > 0) ggml_backend_tensor_get(t, raw_.data(), 0, nbytes);
        conv_.resize(static_cast<size_t>(count));
        size_t k = 0;
        for (int64_t i3 = 0; i3 < t->ne[3]; ++i3) {
            for (int64_t i2 = 0; i2 < t->ne[2]; ++i2) {
                for (int64_t i1 = 0; i1 < t->ne[1]; ++i1) {
                    const uint8_t * row = raw_.data() + i1 * t->nb[1] + i2 * t->nb[2] + i3 * t->nb[3];
                    if (t->type == GGML_TYPE_F32 && t->nb[0] == sizeof(float)) {  // the common case
                        std::memcpy(&conv_[k], row, static_cast<size_t>(t->ne[0]) * sizeof(float));
                        k += static_cast<size_t>(t->ne[0]);
                        continue;
                    }
                    for (int64_t i0 = 0; i0 < t->ne[0]; ++i0) element(t->type, row + i0 * t->nb[0], &conv_[k++]);
                }
            }
        }
        if (std::fwrite(conv_.data(), sizeof(float), conv_.size(), data_.get()) != conv_.size()) {
            fail(kInternal, "io", "cannot write " + dir_ + "/capture.f32");
        }
        Json d;
        d.num("offset", static_cast<long long>(n_floats_)).num("count", count);
        n_floats_ += static_cast<uint64_t>(count);
        return d.dump();
    }

    Json describe(const ggml_tensor * t) {
        Json j;
        j.str("name", ggml_get_name(t)).str("op", ggml_op_desc(t)).str("type", ggml_type_name(t->type));
        j.raw("ne", ne_json(t)).raw("nb", nb_json(t));
        return j;
    }

    int leaf_index(const ggml_tensor * t) {
        auto it = leaves_.find(t);
        if (it != leaves_.end()) return it->second;
        const int idx = n_leaves_++;
        Json j = describe(t);
        j.num("i", idx).raw("data", save(t));
        leaves_json_ += (idx ? "," : "") + j.dump();
        leaves_[t] = idx;
        return idx;
    }

    std::string source_json(const ggml_tensor * s) {
        if (s == nullptr) return "null";  // an unused source slot before a used one (kept: sources are positional)
        Json j;
        j.str("name", ggml_get_name(s)).str("type", ggml_type_name(s->type)).raw("ne", ne_json(s));
        auto it = nodes_.find(s);
        const bool weight = it == nodes_.end() && is_weight(s);
        j.raw("node", it != nodes_.end() ? std::to_string(it->second) : "null");
        j.raw("leaf", it != nodes_.end() || weight ? "null" : std::to_string(leaf_index(s)));
        j.boolean("weight", weight);
        return j.dump();
    }

    void record_node(const ggml_tensor * t) {
        int last = -1;
        for (int k = 0; k < GGML_MAX_SRC; ++k) {
            if (t->src[k] != nullptr) last = k;
        }
        std::string srcs = "[";
        for (int k = 0; k <= last; ++k) srcs += (k ? "," : "") + source_json(t->src[k]);
        int64_t params[GGML_MAX_OP_PARAMS / sizeof(int32_t)];
        const int n_params = static_cast<int>(GGML_MAX_OP_PARAMS / sizeof(int32_t));
        for (int k = 0; k < n_params; ++k) params[k] = t->op_params[k];
        const int idx = n_nodes_++;
        Json j = describe(t);
        j.num("i", idx).raw("op_params", ints_json(params, n_params)).raw("src", srcs + "]").raw("data", save(t));
        nodes_json_ += (idx ? "," : "") + j.dump();
        nodes_[t] = idx;
    }

    std::string dir_;
    FilePtr data_;
    std::string error_;
    uint64_t n_floats_ = 0;
    int n_nodes_ = 0;
    int n_leaves_ = 0;
    std::unordered_map<const ggml_tensor *, int> nodes_;
    std::unordered_map<const ggml_tensor *, int> leaves_;
    std::string nodes_json_;
    std::string leaves_json_;
    std::vector<uint8_t> raw_;
    std::vector<float> conv_;
};

// ---------------------------------------------------------------- commands

void cmd_info(Json & j) {
    j.num("protocol", 1).str("system_info", llama_print_system_info());  // docs/lane-protocol.md
    j.strs("libraries", loaded_engine_libraries());
}

void cmd_vocab(const Args & a, Json & j) {
    Engine e;
    e.model = load_model(a.get("model"), true);
    VocabHandle v = vocab_of(e.model);
    const int32_t n = n_vocab(v);
    const std::string out_path = a.get("out");
    FilePtr out = open_out(out_path);
    for (llama_token t = 0; t < n; ++t) {
        const char * text = token_text(v, t);
        const int attr = token_attr(v, t);
        const std::string piece = token_piece(v, t);
        std::fprintf(out.get(), "%d\t%d\t%s\t%s\t%s\n", t, attr, kind_name(attr),
                     to_hex(text ? text : "", text ? std::strlen(text) : 0).c_str(),
                     to_hex(piece.data(), piece.size()).c_str());
    }
    close_out(out, out_path);
    j.num("n_vocab", n).num("bos_id", bos_of(v)).num("eos_id", eos_of(v));
    j.boolean("add_bos", add_bos_of(v)).boolean("add_eos", add_eos_of(v));
    j.str("vocab_path", out_path);
}

void cmd_tokenize(const Args & a, Json & j) {
    Engine e;
    e.model = load_model(a.get("model"), true);
    VocabHandle v = vocab_of(e.model);
    const std::string text = read_file(a.get("text-file"));
    const bool add_special = a.get_int("add-special", 0) != 0;
    const bool parse_special = a.get_int("parse-special", 0) != 0;
    std::vector<llama_token> ids(text.size() + 8);
    int32_t n = llama_tokenize(v, text.data(), static_cast<int32_t>(text.size()), ids.data(),
                               static_cast<int32_t>(ids.size()), add_special, parse_special);
    if (n < 0) {
        ids.resize(static_cast<size_t>(-n));
        n = llama_tokenize(v, text.data(), static_cast<int32_t>(text.size()), ids.data(),
                           static_cast<int32_t>(ids.size()), add_special, parse_special);
    }
    if (n < 0) fail(kEngine, "tokenize", "llama_tokenize failed with " + std::to_string(n));
    ids.resize(static_cast<size_t>(n));
    j.boolean("add_special", add_special).boolean("parse_special", parse_special);
    j.num("n_bytes", static_cast<long long>(text.size())).ints("ids", ids);
}

struct EvalSettings {
    int32_t threads, n_ctx, n_batch, n_ubatch;
    ggml_type type_k, type_v;
    bool v_fallback;
    std::string extra_bufts;  // requested: default, 0 or 1
};

EvalSettings eval_settings(const Args & a, int32_t n_tokens) {
    EvalSettings s{};
    s.threads = static_cast<int32_t>(a.get_int("threads", 2));
    s.n_ctx = static_cast<int32_t>(a.get_int("n-ctx", n_tokens > 512 ? n_tokens : 512));
    s.n_batch = static_cast<int32_t>(a.get_int("n-batch", s.n_ctx));
    s.n_ubatch = static_cast<int32_t>(a.get_int("n-ubatch", s.n_batch));
    if (s.n_ctx < n_tokens || s.n_batch < n_tokens || s.n_ubatch < n_tokens) {
        fail(kBadInput, "args", "n_ctx, n_batch and n_ubatch must all be >= the number of tokens (one batch, one ubatch)");
    }
    s.type_k = parse_type(a.get("type-k", "f32"));
    s.type_v = parse_type(a.get("type-v", "f32"));
    s.v_fallback = a.get_int("v-f16-fallback", 1) != 0;
    s.extra_bufts = a.get("extra-bufts", "default");
    return s;
}

// Creates the context; October-2024 llama.cpp refuses a non-F16 V cache without flash attention
// ("V cache quantization requires flash_attn"): then F16 V (when allowed), noted in *v_note.
llama_context * new_context(llama_model * model, EvalSettings & s, Capture * capture, std::string * v_note) {
    for (int attempt = 0; attempt < 2; ++attempt) {
        llama_context_params cp = llama_context_default_params();
        cp.n_ctx = static_cast<uint32_t>(s.n_ctx);
        cp.n_batch = static_cast<uint32_t>(s.n_batch);
        cp.n_ubatch = static_cast<uint32_t>(s.n_ubatch);
        cp.n_seq_max = 1;
        cp.n_threads = s.threads;
        cp.n_threads_batch = s.threads;
        cp.type_k = s.type_k;
        cp.type_v = s.type_v;
        cp.embeddings = false;
        cp.offload_kqv = false;  // CPU only; same value as the llama-cpp-python lane
        disable_flash_attn(cp);
        if (capture != nullptr) {
            cp.cb_eval = Capture::callback;
            cp.cb_eval_user_data = capture;
        }
#ifdef PH_HAVE_INIT_FROM_MODEL
        llama_context * ctx = llama_init_from_model(model, cp);
#else
        llama_context * ctx = llama_new_context_with_model(model, cp);
#endif
        if (ctx != nullptr) return ctx;
        if (s.type_v == GGML_TYPE_F16 || !s.v_fallback) break;
        const auto tail = log_tail();
        *v_note = "context refused type_v=" + std::string(type_name(s.type_v)) + " without flash attention (" +
                  (tail.empty() ? std::string("no log") : tail.back()) + "); used f16";
        s.type_v = GGML_TYPE_F16;
    }
    fail_if_out_of_memory("new_context");
    fail(kEngine, "new_context", "cannot create a context");
}

// One llama_decode of every id (positions 0..n-1, one sequence, every position an output); the
// logits are written to out_path. Returns the decode time.
double decode_all(llama_context * ctx, const std::vector<llama_token> & ids, int32_t nv, Capture * capture,
                  const std::string & out_path) {
    const int32_t n_tokens = static_cast<int32_t>(ids.size());
    clear_cache(ctx);
    Batch batch(n_tokens);
    llama_batch & b = batch.get();
    for (int32_t i = 0; i < n_tokens; ++i) {
        b.token[i] = ids[static_cast<size_t>(i)];
        b.pos[i] = i;
        b.n_seq_id[i] = 1;
        b.seq_id[i][0] = 0;
        b.logits[i] = 1;
    }
    b.n_tokens = n_tokens;
    if (capture != nullptr) capture->active = true;
    const auto t1 = std::chrono::steady_clock::now();
    const int32_t rc = llama_decode(ctx, b);
    const double t_decode = seconds_since(t1);
    if (capture != nullptr) capture->active = false;
    if (rc != 0) fail(kEngine, "decode", "llama_decode returned " + std::to_string(rc));

    FilePtr out = open_out(out_path);
    for (int32_t i = 0; i < n_tokens; ++i) {
        const float * row = llama_get_logits_ith(ctx, i);
        if (row == nullptr) fail(kEngine, "logits", "no logits for position " + std::to_string(i));
        if (std::fwrite(row, sizeof(float), static_cast<size_t>(nv), out.get()) != static_cast<size_t>(nv)) {
            fail(kInternal, "io", "cannot write the logits to " + out_path);
        }
    }
    close_out(out, out_path);
    return t_decode;
}

void cmd_eval(const Args & a, Json & j) {
    const std::string raw = read_file(a.get("ids-file"));
    if (raw.size() % 4 != 0 || raw.empty()) fail(kBadInput, "args", "ids file must hold >= 1 little-endian int32");
    std::vector<llama_token> ids(raw.size() / 4);
    std::memcpy(ids.data(), raw.data(), raw.size());
    const int32_t n_tokens = static_cast<int32_t>(ids.size());
    EvalSettings s = eval_settings(a, n_tokens);

    std::unique_ptr<Capture> capture;  // declared first: it outlives the context that calls it
    if (a.has("capture")) capture = std::make_unique<Capture>(a.get("capture"));
    Engine e;
    std::string extra_bufts;
    const auto t0 = std::chrono::steady_clock::now();
    e.model = load_model(a.get("model"), false, s.extra_bufts, &extra_bufts);
    const double t_load = seconds_since(t0);
    const int32_t nv = n_vocab(vocab_of(e.model));
    for (llama_token t : ids) {
        if (t < 0 || t >= nv) fail(kBadInput, "args", "token id " + std::to_string(t) + " outside the vocabulary");
    }
    std::string v_note;
    e.ctx = new_context(e.model, s, capture.get(), &v_note);

    const std::string out_path = a.get("out");
    const double t_decode = decode_all(e.ctx, ids, nv, capture.get(), out_path);  // includes the capture
    if (capture) {
        const int n_nodes = capture->finish(n_tokens);
        j.str("capture_dir", a.get("capture")).num("capture_nodes", n_nodes).num("capture_floats", capture->n_floats());
    }

    j.num("n_tokens", n_tokens).num("n_vocab", nv).str("logits_path", out_path).str("dtype", "float32");
    Json st;
    st.num("threads", s.threads).num("n_ctx", s.n_ctx).num("n_batch", s.n_batch).num("n_ubatch", s.n_ubatch);
    st.num("n_ctx_actual", static_cast<long long>(llama_n_ctx(e.ctx)));
    st.str("type_k", type_name(s.type_k)).str("type_v", type_name(s.type_v)).boolean("flash_attn", false);
    st.boolean("offload_kqv", false).num("n_seq_max", 1).boolean("one_batch", true);
    st.raw("use_extra_bufts", extra_bufts);
    if (!v_note.empty()) st.str("type_v_note", v_note);
    j.raw("settings", st.dump());
    j.dbl("seconds_load", t_load).dbl("seconds_decode", t_decode);
    j.strs("libraries", loaded_engine_libraries());
}

void run_command(const Args & a, Json & status) {
    if (a.command != "info" && !a.has("model")) fail(kUsage, "args", "--model is required");
    if (a.command == "info") {
        cmd_info(status);
    } else if (a.command == "vocab") {
        if (!a.has("out")) fail(kUsage, "args", "--out is required");
        cmd_vocab(a, status);
    } else if (a.command == "tokenize") {
        if (!a.has("text-file")) fail(kUsage, "args", "--text-file is required");
        cmd_tokenize(a, status);
    } else if (a.command == "eval") {
        if (!a.has("ids-file") || !a.has("out")) fail(kUsage, "args", "--ids-file and --out are required");
        cmd_eval(a, status);
    } else {
        fail(kUsage, "args", "unknown command '" + a.command + "' (info, vocab, tokenize, eval)");
    }
}

// The status line of a failure; if even that cannot be built (no memory), a fixed line.
void print_failure(const std::string & command, int code, const std::string & stage, const char * message) {
    try {
        Json status = base_status(command);
        status.boolean("ok", false).num("exit_code", code).str("stage", stage).str("error", message);
        status.strs("engine_log_tail", log_tail());
        std::fputs((status.dump() + "\n").c_str(), stdout);
    } catch (...) {
        std::fprintf(stdout, "{\"ok\":false,\"exit_code\":%d,\"stage\":\"internal\",\"error\":\"out of memory\"}\n",
                     code);
    }
    std::fflush(stdout);
}

}  // namespace

int main(int argc, char ** argv) {
    const std::string command = argc > 1 ? argv[1] : "";
    try {
        Json status = base_status(command);
        Args a = parse_args(argc, argv);
        g_log.verbose = a.has("verbose");
        llama_log_set(log_callback, nullptr);
        llama_backend_init();
        run_command(a, status);
        llama_backend_free();
        status.boolean("ok", true).num("exit_code", kOk);
        std::fputs((status.dump() + "\n").c_str(), stdout);
        std::fflush(stdout);
        return kOk;
    } catch (const HarnessError & f) {
        print_failure(command, f.code(), f.stage(), f.what());
        return f.code();
    } catch (const std::bad_alloc &) {
        print_failure(command, kInternal, "internal", "out of memory (std::bad_alloc)");
    } catch (const std::exception & e) {
        print_failure(command, kInternal, "internal", e.what());
    } catch (...) {
        print_failure(command, kInternal, "internal", "unknown exception");
    }
    return kInternal;
}
