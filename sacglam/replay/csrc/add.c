/* The replay buffer's CPU add as one C function (sacglam/replay/clib.py builds it with sample.c and loads it;
 * sacglam/replay/native.py's NativeWriter calls it).
 *
 * It computes exactly what TorchWriter.add (sacglam/replay/writer.py) computes with ~80 torch ops on [N] vectors (see
 * sacglam/replay/storage.py for the storage layout and the meaning of every column): one step of N envs is checked,
 * then written into row P % C of every column together with the derived tables (rows, ranks, eps, the rarity marks)
 * and the per-env episode bookkeeping. All checks run before the first write, so a refused step leaves the buffer
 * unchanged; the caller turns the returned code and the statistics into the torch path's error messages.
 *
 * Inputs are contiguous CPU arrays in canonical dtypes (int64 ids and lengths, uint8 flags, float32 reward and logp);
 * their widths (Lo_in, K_in, Lc_in, G_in) may differ from the storage's: narrower is padded, wider must be padding.
 */
#include <stdint.h>
#include <string.h>

typedef struct {
    /* storage [C, N, ...] (see storage.py) */
    void *tok;                    /* [C * N, tok_w] token records [obs | cands | cand_len | next_obs | ...] */
    int16_t *obs_len, *next_obs_len;
    uint8_t *terminated, *truncated;
    int64_t *episode, *policy_version;
    float *reward, *logp;
    int32_t *rows, *ranks, *eps, *rare_goal;
    int64_t *goal_count;
    const int64_t *goal_limit;
    int64_t *cur_start, *cur_k, *cur_step, *cur_ach, *lo;  /* [N] */
    int64_t tok_w, token_bytes, row_w, rank_w, N, C, G, Lo, K, Lc, pad_id, token_max, n_goals, counts_goals,
        max_limit, P;
    /* inputs of one step of N envs */
    const int64_t *obs, *obs_len_in, *next_obs, *next_obs_len_in;                     /* [N, Lo_in], [N] */
    const int64_t *cands, *cand_len_in, *next_cands, *next_cand_len_in;               /* [N, K_in, Lc_in], [N, K_in] */
    const int64_t *goal, *action, *achieved, *policy_version_in;                     /* [N], [N, G_in] */
    const float *reward_in, *logp_in;
    const uint8_t *terminated_in, *truncated_in;
    int64_t Lo_in, K_in, Lc_in, G_in;
    int64_t *scratch;             /* [2, N]: lo after this step, achieved goals per env */
    /* outputs: stats = [width field (0 obs, 1 next obs, 2 cands, 3 next cands, -1 none), its need, max token id,
     * max cur_step, goal min, goal max, achieved min, achieved max, action min, action max, n_sampleable] */
    int64_t *stats;
} AddArgs;

enum { T_ = 0, EPK = 1, GOAL = 2, ACHB = 3, TERM = 4, ACT = 5, OL = 6, NOL = 7, REW = 8, LOGP = 9, F = 10 };
enum { ADD_OK = 0, ADD_WIDTH = 1, ADD_TOKEN = 2, ADD_EPISODE = 3, ADD_GOAL = 4, ADD_ACHIEVED = 5, ADD_ACTION = 6 };

static inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }
static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* The stored value of position j of an id row of input width w and length len: the id when j < len and j < w,
 * else padding (as _fit then _pad_past make it). */
static inline int64_t fitted(const AddArgs *a, const int64_t *src, int64_t w, int64_t len, int64_t j) {
    return j < len && j < w ? src[j] : a->pad_id;
}

/* max(lens) over n entries when the input is wider than the storage (the content it must not cut), else -1. */
static int64_t need_of(const int64_t *lens, int64_t n, int64_t in_w, int64_t w) {
    if (in_w <= w) return -1;
    int64_t need = 0;
    for (int64_t i = 0; i < n; i++) need = max64(need, lens[i]);
    return need;
}

static void store_ids(const AddArgs *a, void *dst, const int64_t *src, int64_t in_w, int64_t len, int64_t w) {
    if (a->token_bytes == 2) {
        int16_t *d = (int16_t *)dst;
        for (int64_t j = 0; j < w; j++) d[j] = (int16_t)fitted(a, src, in_w, len, j);
    } else {
        int32_t *d = (int32_t *)dst;
        for (int64_t j = 0; j < w; j++) d[j] = (int32_t)fitted(a, src, in_w, len, j);
    }
}

static void store_len(const AddArgs *a, void *dst, int64_t k, int64_t len) {
    if (a->token_bytes == 2) ((int16_t *)dst)[k] = (int16_t)len; else ((int32_t *)dst)[k] = (int32_t)len;
}

/* Returns ADD_OK after writing the step, or the first failed check (nothing written; stats say why). */
int sacglam_add(const AddArgs *a) {
    const int64_t N = a->N, C = a->C, G = a->G, Lo = a->Lo, K = a->K, Lc = a->Lc, S = C + 1, P = a->P;
    const int64_t row = P % C, KL = K * Lc, H = Lo + KL + K;
    int64_t *st = a->stats;

    /* Checks, in the torch path's order: widths, then the largest token id, episode length, goal, achieved and
     * action ranges. */
    const int64_t needs[4] = {need_of(a->obs_len_in, N, a->Lo_in, Lo), need_of(a->next_obs_len_in, N, a->Lo_in, Lo),
                              need_of(a->cand_len_in, N * a->K_in, a->Lc_in, Lc),
                              need_of(a->next_cand_len_in, N * a->K_in, a->Lc_in, Lc)};
    st[0] = -1;
    st[1] = 0;
    for (int f = 0; f < 4; f++) {
        const int64_t w = f < 2 ? Lo : Lc;
        if (needs[f] > w) {
            st[0] = f;
            st[1] = needs[f];
            return ADD_WIDTH;
        }
    }
    int64_t tok_max = INT64_MIN;
    for (int64_t e = 0; e < N; e++) {
        for (int64_t j = 0; j < Lo; j++) {
            tok_max = max64(tok_max, fitted(a, a->obs + e * a->Lo_in, a->Lo_in, a->obs_len_in[e], j));
            tok_max = max64(tok_max, fitted(a, a->next_obs + e * a->Lo_in, a->Lo_in, a->next_obs_len_in[e], j));
        }
        for (int64_t k = 0; k < a->K_in; k++) {
            const int64_t c = (e * a->K_in + k);
            for (int64_t j = 0; j < Lc; j++) {
                tok_max = max64(tok_max, fitted(a, a->cands + c * a->Lc_in, a->Lc_in, a->cand_len_in[c], j));
                tok_max = max64(tok_max, fitted(a, a->next_cands + c * a->Lc_in, a->Lc_in, a->next_cand_len_in[c], j));
            }
        }
    }
    int64_t ep_steps = INT64_MIN, g_min = INT64_MAX, g_max = INT64_MIN, a_min = INT64_MAX, a_max = INT64_MIN;
    int64_t act_min = INT64_MAX, act_max = INT64_MIN, n_sampleable = 0;
    int64_t *new_lo = a->scratch, *counts = a->scratch + N;
    for (int64_t e = 0; e < N; e++) {
        ep_steps = max64(ep_steps, a->cur_step[e]);
        g_min = min64(g_min, a->goal[e]);
        g_max = max64(g_max, a->goal[e]);
        act_min = min64(act_min, a->action[e]);
        act_max = max64(act_max, a->action[e]);
        for (int64_t j = 0; j < a->G_in; j++) {
            a_min = min64(a_min, a->achieved[e * a->G_in + j]);
            a_max = max64(a_max, a->achieved[e * a->G_in + j]);
        }
        /* The row about to be overwritten (absolute P - C) breaks its episode: lo moves past that episode. */
        int64_t lo = a->lo[e];
        if (P >= C) {
            const int32_t *old = a->rows + (row * N + e) * a->row_w;
            lo = max64(lo, (int64_t)a->eps[(int64_t)old[EPK] * 2] - old[T_] + (P - C));
        }
        new_lo[e] = lo;
        const int64_t done = a->terminated_in[e] || a->truncated_in[e];
        n_sampleable += (done ? P + 1 : a->cur_start[e]) - lo;
    }
    int64_t *out = st + 2;
    out[0] = tok_max, out[1] = ep_steps, out[2] = g_min, out[3] = g_max, out[4] = a_min, out[5] = a_max;
    out[6] = act_min, out[7] = act_max, out[8] = n_sampleable;
    if (tok_max > a->token_max) return ADD_TOKEN;
    if (ep_steps >= C) return ADD_EPISODE;
    if (g_min < 0 || g_max >= a->n_goals) return ADD_GOAL;
    if (a_min < -1 || a_max >= a->n_goals) return ADD_ACHIEVED;
    if (act_min < 0 || act_max >= K) return ADD_ACTION;

    /* Writes. */
    for (int64_t e = 0; e < N; e++) {
        const int64_t flat = row * N + e, slot = a->cur_k[e] % S;
        const int64_t ol = a->obs_len_in[e], nol = a->next_obs_len_in[e];
        char *rec = (char *)a->tok + flat * a->tok_w * a->token_bytes;
        const int64_t tb = a->token_bytes;
        store_ids(a, rec, a->obs + e * a->Lo_in, a->Lo_in, ol, Lo);
        store_ids(a, rec + H * tb, a->next_obs + e * a->Lo_in, a->Lo_in, nol, Lo);
        for (int64_t k = 0; k < K; k++) {
            const int64_t c = e * a->K_in + k;
            const int here = k < a->K_in;
            const int64_t cl = here ? a->cand_len_in[c] : 0, ncl = here ? a->next_cand_len_in[c] : 0;
            store_ids(a, rec + (Lo + k * Lc) * tb, here ? a->cands + c * a->Lc_in : NULL, here ? a->Lc_in : 0, cl,
                      Lc);
            store_ids(a, rec + (H + Lo + k * Lc) * tb, here ? a->next_cands + c * a->Lc_in : NULL,
                      here ? a->Lc_in : 0, ncl, Lc);
            store_len(a, rec + (Lo + KL) * tb, k, cl);
            store_len(a, rec + (H + Lo + KL) * tb, k, ncl);
        }
        a->obs_len[flat] = (int16_t)ol;
        a->next_obs_len[flat] = (int16_t)nol;
        a->terminated[flat] = a->terminated_in[e] != 0;
        a->truncated[flat] = a->truncated_in[e] != 0;
        a->episode[flat] = a->cur_k[e] * N + e;
        a->policy_version[flat] = a->policy_version_in[e];
        a->reward[flat] = a->reward_in[e];
        a->logp[flat] = a->logp_in[e];

        int32_t *r = a->rows + flat * a->row_w;
        int32_t rew_bits, logp_bits;
        memcpy(&rew_bits, &a->reward[flat], 4);
        memcpy(&logp_bits, &a->logp[flat], 4);
        const int32_t vals[F] = {(int32_t)a->cur_step[e], (int32_t)(slot * N + e), (int32_t)a->goal[e],
                                 (int32_t)a->cur_ach[e], a->terminated_in[e] != 0, (int32_t)a->action[e],
                                 (int32_t)ol, (int32_t)nol, rew_bits, logp_bits};
        memcpy(r, vals, sizeof vals);
        int64_t count = 0;  /* the achieved ids, valid first (a stable left-alignment), padded with -1 */
        for (int64_t j = 0; j < a->G_in; j++)
            if (a->achieved[e * a->G_in + j] >= 0) r[F + count++] = (int32_t)a->achieved[e * a->G_in + j];
        for (int64_t j = count; j < G; j++) r[F + j] = -1;
        counts[e] = count;

        /* _ranks: reset this row; the r-th achieving step (r = cur_ach) is recorded at row start + r (<= this row). */
        int32_t *rk = a->ranks + flat * a->rank_w;
        rk[0] = -1, rk[1] = 0, rk[2] = 0;
        for (int64_t j = 0; j < G; j++) rk[3 + j] = -1;
        if (count) {
            int32_t *src = a->ranks + (((a->cur_start[e] + a->cur_ach[e]) % C) * N + e) * a->rank_w;
            src[0] = (int32_t)a->cur_step[e], src[1] = (int32_t)count, src[2] = (int32_t)(count - 1);
            for (int64_t j = 0; j < G; j++) src[3 + j] = r[F + j];
        }
        int32_t *ep = a->eps + (slot * N + e) * 2;
        ep[0] = (int32_t)(a->cur_step[e] + 1);
        ep[1] = (int32_t)(a->cur_ach[e] + (count > 0));
    }

    if (a->counts_goals) {
        /* mark_rare (rarity.py): count every env's achievements first, then mark the rows that lead to each env's
         * rarest one. */
        for (int64_t e = 0; e < N; e++)
            for (int64_t j = 0; j < counts[e]; j++) a->goal_count[a->rows[(row * N + e) * a->row_w + F + j]] += 1;
        for (int64_t e = 0; e < N; e++) a->rare_goal[row * N + e] = -1;  /* the row was just overwritten */
        const int64_t W = min64(a->max_limit, C);
        for (int64_t e = 0; e < N; e++) {
            if (!counts[e]) continue;
            const int32_t *r = a->rows + (row * N + e) * a->row_w;
            int64_t g = r[F], g_count = a->goal_count[g];
            for (int64_t j = 1; j < counts[e]; j++) {  /* the rarest achieved goal, the first of ties */
                if (a->goal_count[r[F + j]] < g_count) g = r[F + j], g_count = a->goal_count[g];
            }
            const int64_t limit = a->goal_limit[g] > 0 ? a->goal_limit[g] : a->max_limit;
            for (int64_t back = 0; back < W && back <= a->cur_step[e] && back < limit; back++) {
                int32_t *mark = a->rare_goal + (((row - back) % C + C) % C) * N + e;
                if (*mark < 0 || g_count < a->goal_count[*mark]) *mark = (int32_t)g;
            }
        }
    }

    /* Episode ends: the next row starts a new episode. */
    for (int64_t e = 0; e < N; e++) {
        const int64_t done = a->terminated_in[e] || a->truncated_in[e];
        a->lo[e] = new_lo[e];
        a->cur_ach[e] = done ? 0 : a->cur_ach[e] + (counts[e] > 0);
        a->cur_step[e] = done ? 0 : a->cur_step[e] + 1;
        a->cur_k[e] += done;
        if (done) a->cur_start[e] = P + 1;
    }
    return ADD_OK;
}
